/* A target's view (view.h), read from the store, and with `check` the
 * instances and the live set's health asked now (as `deployctl status`
 * does). serve builds its views from what it polls instead. */
#ifndef DEPLOY_DESCRIBE_H
#define DEPLOY_DESCRIBE_H

#include <jansson.h>

#include "service.h"
#include "view.h"

typedef struct describe_opts {
  int check;               /* ask the provider and the health checks now */
} describe_opts;

/* view: borrowed during the call (json_incref to keep it); NULL with err. */
typedef void (*describe_cb)(void *payload, const json_t *view, const char *err);

int service_describe(service *svc, const char *target, const describe_opts *o, describe_cb cb, void *payload,
                     char *err);

#endif
