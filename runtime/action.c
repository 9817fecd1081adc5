/* The strategy interface's own checks (the strategies live in strategies/). */
#include "action.h"

#include "util.h"

void strategy_free(strategy *s) {
  if (s && s->free)
    s->free(s);
}

int strategy_check(const strategy *s, char *err) {
  if (!s) {
    dc_fmt(err, DC_ERR_MAX, "deploy: no strategy given");
    return -1;
  }
  if (s->version != STRATEGY_VERSION) {
    dc_fmt(err, DC_ERR_MAX, "deploy: strategy '%s' was built for interface version %d, this deployctl has %d",
           s->name ? s->name : "?", s->version, STRATEGY_VERSION);
    return -1;
  }
  if (!s->name || !s->free || !s->step == !s->drive) {
    dc_fmt(err, DC_ERR_MAX, "deploy: strategy '%s' must have a name, a free function and exactly one of step or "
           "drive", s->name ? s->name : "?");
    return -1;
  }
  return 0;
}

