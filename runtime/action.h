/* The vocabulary of a rollout: the actions the engine carries out, and the
 * strategy interface that names them. Built-in strategies (strategies/)
 * are step machines over this vocabulary; a Lua strategy is a driver that
 * calls rollout_action() itself. The runtime knows only this interface,
 * never a particular strategy. */
#ifndef DEPLOY_ACTION_H
#define DEPLOY_ACTION_H

#include <stddef.h>

#include "routes.h"

#define STRATEGY_VERSION 4

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
  double seconds;      /* ACTION_WAIT; ACTION_START: how many (0: the target's count) */
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

typedef struct rollout rollout;
typedef struct strategy strategy;
struct analysis_spec;

/* A strategy is one of two shapes (cf. libgit2's odb_backend: a versioned
 * struct of function pointers, `free` required):
 *   - a step machine: `step` names the next action given the run; the
 *     rollout carries it out, records the outcome in the run and asks
 *     again (canary, blue-green);
 *   - a driver: `drive` takes the rollout over and calls rollout_action()
 *     until it ends it with ACTION_PROMOTE or ACTION_ABORT (a Lua
 *     strategy's execute(d), run as a coroutine by the bindings).
 * Exactly one of them is set. */
struct strategy {
  int version;         /* STRATEGY_VERSION */
  const char *name;    /* "canary", "blue-green", a Lua class's name */
  char health_check_url[512]; /* "" or a URL with {host} {port} placeholders */
  /* Measured during every hold (analysis_spec.h), owned by the strategy;
   * NULL: the target's analysis, if it has one. */
  const struct analysis_spec *analysis;
  void (*step)(const strategy *s, strategy_run *run, strategy_action *out);
  void (*drive)(strategy *s, rollout *r);
  void (*free)(strategy *s);
  /* Routes the rollout asks of the router besides weights (version 3):
   * sticky canaries (affinity_*) and testers' routes (test_*); the rest
   * of route_rules is the rollout's to fill. Zeroed: none. */
  route_rules routes;
};

/* -1 with err naming the strategy when its version or shape is wrong: a
 * vtable from another build is refused before it is ever called. */
int strategy_check(const strategy *s, char *err);
void strategy_free(strategy *s); /* NULL-safe */

#endif
