/* Built-in strategies are step machines. Given the run's state, step()
 * names the next action; the rollout carries it out asynchronously, records
 * it, stores the outcome in the run and calls step() again. Nothing in a
 * strategy blocks, sleeps or touches I/O, which is what lets one loop run
 * many rollouts, abort any of them at any point, and simulate them on the
 * virtual clock. */
#ifndef DEPLOY_STRATEGY_H
#define DEPLOY_STRATEGY_H

#include <stddef.h>

#define STRATEGY_VERSION 1

typedef enum {
  ACTION_START,        /* start the new instances beside the old ones */
  ACTION_WAIT_HEALTHY, /* until every new instance answers its health check */
  ACTION_TRAFFIC,      /* give the new version `pct` % of the traffic */
  ACTION_WAIT,         /* `seconds` on the engine clock, health-gated */
  ACTION_VERIFY,       /* health of the new instances right after a switch */
  ACTION_PROMOTE,      /* new version becomes current; old instances stop */
  ACTION_ABORT,        /* traffic back to old in one step; new instances stop */
  ACTION_PAUSE,        /* until an operator says promote (go on) or abort */
} action_kind;

typedef struct strategy_action {
  action_kind kind;
  double pct;          /* ACTION_TRAFFIC */
  double seconds;      /* ACTION_WAIT */
  char reason[512];    /* ACTION_ABORT */
} strategy_action;

/* What a step machine sees of its run. */
typedef struct strategy_run {
  int phase;           /* private progress counter, 0 at the start */
  int has_old;         /* an old version serves traffic (not a first deploy) */
  double pct;          /* the new version's share now */
  int last_ok;         /* outcome of the previous action */
  char last_error[512];/* why it failed, when !last_ok */
  int step, steps;     /* progress through the traffic steps, for display */
} strategy_run;

typedef struct strategy strategy;
struct strategy {
  int version;
  const char *name;    /* "canary", "blue-green" */
  char health_check_url[512]; /* "" or a URL with {host} {port} placeholders */
  /* Names the next action; reads and updates run->phase. */
  void (*step)(const strategy *s, strategy_run *run, strategy_action *out);
  void (*free)(strategy *s);
};

#define CANARY_MAX_PAUSES 16

typedef struct canary_params {
  double initial_percentage;  /* 0 < x <= 100; default 10 */
  double increment;           /* 0 < x <= 100; default 10 */
  double interval;            /* seconds >= 0; default 300 */
  const char *health_check_url;
  double pause_at[CANARY_MAX_PAUSES]; /* shares at which to wait for an operator */
  int npause;
} canary_params;

typedef struct bluegreen_params {
  double switch_delay;        /* seconds >= 0; default 0 */
  const char *health_check_url;
} bluegreen_params;

typedef struct canary_strategy {
  strategy base;
  double initial_percentage, increment, interval;
  double pause_at[CANARY_MAX_PAUSES];
  int npause;
} canary_strategy;

typedef struct bluegreen_strategy {
  strategy base;
  double switch_delay;
} bluegreen_strategy;

void canary_params_default(canary_params *p);
void bluegreen_params_default(bluegreen_params *p);
/* -1 with err naming the parameter and the accepted values. */
int strategy_canary_new(strategy **out, const canary_params *p, char *err);
int strategy_bluegreen_new(strategy **out, const bluegreen_params *p, char *err);
void strategy_free(strategy *s); /* NULL-safe */

/* A health_check_url must be http(s)://host[:port]/... after the {host} and
 * {port} placeholders are filled. */
int strategy_check_url(const char *url, const char *param, char *err);

#endif
