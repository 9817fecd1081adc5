/* Blue-green: start green beside blue, wait until healthy, wait
 * switch_delay, move 100 % of the traffic in one step, verify, promote (blue
 * stops). Green never healthy: blue keeps the traffic. Unhealthy after the
 * switch: straight back to blue in one step. */
#include <stdlib.h>
#include <string.h>

#include "strategy.h"
#include "util.h"

enum { START, WAIT_HEALTHY, DELAY, SWITCH, VERIFY, PROMOTE, DONE };

void bluegreen_params_default(bluegreen_params *p) {
  p->switch_delay = 0;
  p->health_check_url = NULL;
  memset(&p->routes, 0, sizeof p->routes);
}

static void bluegreen_step(const strategy *s, strategy_run *run, strategy_action *out) {
  const bluegreen_strategy *b = (const bluegreen_strategy *)s;
  memset(out, 0, sizeof *out);
  run->steps = 1;
  if (run->phase != START && !run->last_ok && run->phase != DONE) {
    out->kind = ACTION_ABORT;
    if (run->pct > 0)
      dc_fmt(out->reason, sizeof out->reason, "green failed after the switch, traffic returned to blue: %s", run->last_error);
    else
      dc_fmt(out->reason, sizeof out->reason, "green not switched to: %s", run->last_error);
    run->phase = DONE;
    return;
  }
  switch (run->phase) {
  case START:
    out->kind = ACTION_START;
    run->phase = WAIT_HEALTHY;
    return;
  case WAIT_HEALTHY:
    out->kind = ACTION_WAIT_HEALTHY;
    run->phase = b->switch_delay > 0 ? DELAY : SWITCH;
    return;
  case DELAY:
    out->kind = ACTION_WAIT;
    out->seconds = b->switch_delay;
    run->phase = SWITCH;
    return;
  case SWITCH:
    out->kind = ACTION_TRAFFIC;
    out->pct = 100;
    run->step = 1;
    run->phase = VERIFY;
    return;
  case VERIFY:
    out->kind = ACTION_VERIFY;
    run->phase = PROMOTE;
    return;
  case PROMOTE:
    out->kind = ACTION_PROMOTE;
    run->phase = DONE;
    return;
  default:
    out->kind = ACTION_ABORT;
    dc_fmt(out->reason, sizeof out->reason, "blue-green step machine ran past its end");
    return;
  }
}

static void bluegreen_free(strategy *s) { free(s); }

int strategy_bluegreen_new(strategy **out, const bluegreen_params *p, char *err) {
  *out = NULL;
  if (!(p->switch_delay >= 0 && p->switch_delay < 1e9)) {
    dc_fmt(err, DC_ERR_MAX, "deploy: BlueGreenStrategy switch_delay must be a number of seconds >= 0, got %g", p->switch_delay);
    return -1;
  }
  if (strategy_check_url(p->health_check_url, "BlueGreenStrategy health_check_url", err) ||
      strategy_check_routes(&p->routes, "BlueGreenStrategy", 0, err))
    return -1;
  bluegreen_strategy *b = calloc(1, sizeof *b);
  if (!b) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  b->base.version = STRATEGY_VERSION;
  b->base.name = "blue-green";
  b->base.step = bluegreen_step;
  b->base.free = bluegreen_free;
  dc_strlcpy(b->base.health_check_url, p->health_check_url ? p->health_check_url : "", sizeof b->base.health_check_url);
  b->switch_delay = p->switch_delay;
  b->base.routes = p->routes;
  *out = &b->base;
  return 0;
}
