/* Notifications: one message per thing a person wants to hear about a
 * rollout, to a Slack-compatible incoming webhook ({"text": ...}) or as
 * plain JSON, declared on a target (targets.X.notify in the config).
 *
 *   started      info      a rollout (or a rollback) began
 *   paused       warning   it waits for an operator, or for a gate webhook
 *   promoted     info      the new version is current (a rollback: warning)
 *   rolled_back  error     it failed after traffic moved; the old version serves again
 *   failed       error     it failed before traffic moved
 *
 * Every rollout ends with exactly one of promoted, rolled_back, failed.
 * A destination hears the events at or above its severity. Messages carry
 * the reason and a summary, and no links. They are sent through an outbox
 * (outbox.h): never waited for, in order, retried a bounded number of
 * times, then dropped with a line on stderr: a notification can neither
 * hold nor fail a rollout. */
#ifndef DEPLOY_NOTIFY_H
#define DEPLOY_NOTIFY_H

#include <stddef.h>

#include "engine.h"
#include "store.h"
#include "webhook.h"

typedef enum { NOTIFY_INFO, NOTIFY_WARNING, NOTIFY_ERROR } notify_severity;
typedef enum { NOTIFY_SLACK, NOTIFY_JSON } notify_format;

#define NOTIFY_MAX 16

typedef struct notify_dest {
  webhook to;                 /* url, secret, timeout, retries (name, type unused) */
  notify_format format;
  notify_severity severity;   /* the least severe event sent */
} notify_dest;

typedef struct notify_list {
  notify_dest *v;
  size_t n;
} notify_list;

/* A declaration as given: NULL, or NAN for a number, where nothing was. */
typedef struct notify_spec {
  const char *url;
  const char *format;         /* "slack" (default) or "json" */
  const char *severity;       /* "info" (default), "warning" or "error" */
  const char *secret;
  double timeout;
  double retries;
} notify_spec;

/* Checks s, expands ${NAME} (a Slack URL is a secret: its value is
 * registered as one when it comes from the environment), appends it. -1
 * with field and err filled (as webhook_add), l unchanged. */
int notify_add(notify_list *l, const notify_spec *s, char *field, size_t fsize, char *err);
void notify_list_clear(notify_list *l);

typedef struct notifier notifier;

/* For one rollout; l is copied. NULL when l is empty or memory runs out. */
notifier *notifier_new(engine *e, const notify_list *l);
/* Every event of the rollout; NULL-safe. */
void notifier_event(notifier *n, const store_event *ev);
/* The rollout has ended: freed once its last message has gone. NULL-safe. */
void notifier_release(notifier *n);

#endif
