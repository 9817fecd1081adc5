/* The webhooks of one rollout as its hooks (rollout.h's rollout_hooks):
 * which kinds run at which hook point, and what their answers do.
 *
 *   before_deploy    confirm-rollout            gate
 *   before_step      pre-rollout (once, before the first traffic reaches
 *                    the new version), then confirm-traffic-increase
 *                    (when the share grows)      call, gate
 *   analysis         rollout, then rollback     call, ask
 *   before_promote   confirm-promotion          gate
 *   on_promote,
 *   on_abort         post-rollout               call
 *   every event      event                      outbox
 *
 * call: POSTed with retries; not answered 2xx in the end, it fails the
 *   hook (the rollout aborts; after the outcome, it is recorded).
 * gate: asked every `interval` until it answers 2xx, holding the rollout;
 *   meanwhile the rollback webhooks are asked too and, once traffic may
 *   reach the new version, its health is watched as in a wait: unhealthy
 *   (failure_threshold rounds in a row) or dead fails the gate, as does
 *   an abort (deployctl abort, Ctrl-C).
 * ask (rollback, as Flagger's): a 2xx answer fails the hook, which rolls
 *   the rollout back; any other answer, or none, lets it go on.
 * event: every event of the rollout, in order, never waited for.
 *
 * A rollback deployment (deployctl rollback) runs only the event
 * webhooks: no gate holds a way back. */
#ifndef DEPLOY_WEBHOOK_HOOKS_H
#define DEPLOY_WEBHOOK_HOOKS_H

#include "rollout.h"
#include "store.h"
#include "webhook.h"

typedef struct webhook_hooks webhook_hooks;

/* For one rollout; l is copied. events_only: a rollback's. NULL when l
 * is empty (nothing to run) or memory runs out. */
webhook_hooks *webhook_hooks_new(engine *e, const webhook_list *l, int events_only);
/* The hooks to hand the rollout (rollout_opts.webhook_hooks). */
const rollout_hooks *webhook_hooks_vtable(webhook_hooks *w);
/* Every event of the rollout, for the event webhooks. NULL-safe. */
void webhook_hooks_event(webhook_hooks *w, const store_event *ev);
/* The rollout has ended: freed once nothing of it is in flight. NULL-safe. */
void webhook_hooks_release(webhook_hooks *w);

#endif
