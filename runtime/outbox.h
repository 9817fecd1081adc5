/* An outbox: JSON POSTs that must never hold anything up or fail anything
 * (event webhooks, notifications). They are sent one at a time, in the
 * order they were posted (a receiver reads "started" before "promoted"),
 * each tried 1 + its webhook's retries times; one that still fails is said
 * on stderr and dropped. At most OUTBOX_MAX wait: past that, new posts are
 * dropped (and said) rather than queued without bound. */
#ifndef DEPLOY_OUTBOX_H
#define DEPLOY_OUTBOX_H

#include <jansson.h>

#include "engine.h"
#include "webhook.h"

#define OUTBOX_MAX 256

typedef struct outbox outbox;

/* NULL when out of memory. */
outbox *outbox_new(engine *e);
/* Queues body (taken) for w (copied: url, secret, timeout, retries).
 * label: X-Deploy-Webhook, or NULL. what: who sends, for the log line
 * ("notification", "event webhook 'audit'"). NULL-safe (b or body). */
void outbox_post(outbox *b, const webhook *w, const char *label, json_t *body, const char *what);
/* The owner is done with it: it frees itself once the last post has gone
 * or been dropped. NULL-safe. */
void outbox_release(outbox *b);

#endif
