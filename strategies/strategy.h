/* The built-in strategies: step machines over runtime/action.h's
 * vocabulary. Given the run's state, step() names the next action; the
 * rollout carries it out asynchronously, records it, stores the outcome in
 * the run and calls step() again. Nothing in a strategy blocks, sleeps or
 * touches I/O, which is what lets one loop run many rollouts, abort any of
 * them at any point, and simulate them on the virtual clock. */
#ifndef DEPLOY_STRATEGY_H
#define DEPLOY_STRATEGY_H

#include <stddef.h>

#include <jansson.h>

#include "action.h"
#include "analysis_spec.h"

#define CANARY_MAX_PAUSES 16
/* Traffic steps a canary may take up to 100 % (from 10 %, an increment of
 * 0.1 % takes 901): beyond it a share moves by less than HAProxy's integer
 * weights can show, or not at all. */
#define CANARY_MAX_STEPS 1000

typedef struct canary_params {
  double initial_percentage;  /* 0 < x <= 100; default 10 */
  double increment;           /* 0 < x <= 100; default 10 */
  double interval;            /* seconds >= 0; default 300 */
  const char *health_check_url;
  double pause_at[CANARY_MAX_PAUSES]; /* shares at which to wait for an operator */
  int npause;
  route_rules routes;         /* session_affinity (affinity_*), test_route (test_*) */
  const json_t *analysis;     /* NULL, or { interval, failure_limit, metrics } */
} canary_params;

typedef struct bluegreen_params {
  double switch_delay;        /* seconds >= 0; default 0 */
  double scale_down_delay;    /* seconds >= 0 blue stays up after the switch; default 30 */
  const char *health_check_url;
  route_rules routes;         /* test_route (test_*) */
  const json_t *analysis;
} bluegreen_params;

typedef struct canary_strategy {
  strategy base;
  double initial_percentage, increment, interval;
  double pause_at[CANARY_MAX_PAUSES];
  int npause;
  analysis_spec *analysis;    /* base.analysis */
} canary_strategy;

typedef struct bluegreen_strategy {
  strategy base;
  double switch_delay;
  double scale_down_delay;
  analysis_spec *analysis;
} bluegreen_strategy;

void canary_params_default(canary_params *p);
void bluegreen_params_default(bluegreen_params *p);
/* -1 with err naming the parameter and the accepted values. */
int strategy_canary_new(strategy **out, const canary_params *p, char *err);
int strategy_bluegreen_new(strategy **out, const bluegreen_params *p, char *err);

/* A built-in strategy from an object such as {"kind": "canary",
 * "interval": 60} (a GitOps manifest's): 1 with *out set when kind names a
 * built-in strategy, -1 with err naming the parameter when its parameters
 * are wrong, 0 when kind is not a built-in one (*out NULL). */
int strategy_from_json(const json_t *obj, strategy **out, char *err);
/* The parameters each built-in strategy takes, for messages. */
extern const char *const canary_param_names[];
extern const char *const bluegreen_param_names[];

/* The routes a strategy asks for (action.h): -1 with err naming cls's
 * parameter when a name or value is not usable, when a test route names
 * both or neither of header and cookie, or when affinity is asked of a
 * strategy that has none (affinity_ok 0: blue-green moves everyone at
 * once). */
int strategy_check_routes(const route_rules *r, const char *cls, int affinity_ok, char *err);

/* A health_check_url must be http(s)://host[:port]/... after the {host} and
 * {port} placeholders are filled. */
int strategy_check_url(const char *url, const char *param, char *err);

#endif
