/* What every provider shares: the check of its vtable. */
#include "provider.h"

#include "util.h"

int provider_check(const provider *p, char *err) {
  if (!p) {
    dc_fmt(err, DC_ERR_MAX, "deploy: no provider given");
    return -1;
  }
  if (p->version != PROVIDER_VERSION) {
    dc_fmt(err, DC_ERR_MAX, "deploy: provider '%s' was built for interface version %d, this deployctl has %d",
           p->kind ? p->kind : "?", p->version, PROVIDER_VERSION);
    return -1;
  }
  if (!p->kind || !p->start || !p->stop || !p->inspect || !p->logs || !p->logs_stop || !p->free) {
    dc_fmt(err, DC_ERR_MAX, "deploy: provider '%s' lacks one of start, stop, inspect, logs, logs_stop, free",
           p->kind ? p->kind : "?");
    return -1;
  }
  return 0;
}
