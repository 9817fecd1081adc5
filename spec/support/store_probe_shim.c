/* Until the store front (runtime/store.c on main) lands on this branch: the
 * helpers store_backend.h says the front provides, so that store-probe can
 * run the PostgreSQL backend on its own. Removed when main is merged. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "store_backend.h"

#define GROW(arr, n, type)                                                                                  \
  do {                                                                                                      \
    type *grown = realloc((arr), ((n) + 1) * sizeof(type));                                                 \
    if (!grown)                                                                                             \
      return NULL;                                                                                          \
    (arr) = grown;                                                                                          \
    memset(&(arr)[(n)], 0, sizeof(type));                                                                   \
    return &(arr)[(n)++];                                                                                   \
  } while (0)

store_deployment *store_op_add_deployment(store_op *op) { GROW(op->deployments, op->ndeployments, store_deployment); }
store_instance *store_op_add_instance(store_op *op) { GROW(op->instances, op->ninstances, store_instance); }
store_event *store_op_add_event(store_op *op) { GROW(op->events, op->nevents, store_event); }
store_control *store_op_add_control(store_op *op) { GROW(op->controls, op->ncontrols, store_control); }

int store_op_add_port(store_op *op, int port) {
  int *ports = realloc(op->ports, (op->nports + 1) * sizeof *ports);
  if (!ports)
    return -1;
  op->ports = ports;
  op->ports[op->nports++] = port;
  return 0;
}

void store_op_fail(store_op *op, int rc, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char what[DC_ERR_MAX];
  dc_vfmt(what, sizeof what, fmt, ap);
  va_end(ap);
  dc_fmt(op->err, sizeof op->err, "deploy: store: %s", what);
  op->rc = rc;
}

void store_deployment_clear(store_deployment *d) {
  if (!d)
    return;
  free(d->errors);
  free(d->metadata);
  memset(d, 0, sizeof *d);
}

void store_event_clear(store_event *e) {
  if (!e)
    return;
  free(e->data);
  memset(e, 0, sizeof *e);
}
