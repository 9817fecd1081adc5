/* Webhooks: HTTP calls a rollout makes at its phases, Flagger's kinds,
 * declared on a target (the config), on a strategy, or on a GitOps
 * manifest's strategy object. This file holds what a webhook is (checked
 * field by field, the same way wherever it was declared) and one delivery
 * of it: a JSON payload, signed with HMAC-SHA256 over the body when the
 * webhook has a secret (X-Deploy-Signature: sha256=<hex>), POSTed with a
 * timeout. When each kind is called, and what its answer does to the
 * rollout, is webhook_hooks.c's. */
#ifndef DEPLOY_WEBHOOK_H
#define DEPLOY_WEBHOOK_H

#include <stddef.h>

#include <jansson.h>

#include "engine.h"
#include "httpreq.h"
#include "util.h"

typedef enum {
  WEBHOOK_CONFIRM_ROLLOUT,           /* gate: before anything starts */
  WEBHOOK_PRE_ROLLOUT,               /* before the first traffic reaches the new version */
  WEBHOOK_ROLLOUT,                   /* at every analysis step */
  WEBHOOK_CONFIRM_TRAFFIC_INCREASE,  /* gate: before every increase of the new version's share */
  WEBHOOK_CONFIRM_PROMOTION,         /* gate: before the promotion */
  WEBHOOK_POST_ROLLOUT,              /* after the promotion or the rollback */
  WEBHOOK_ROLLBACK,                  /* asked at every step and while a gate waits: 2xx rolls back */
  WEBHOOK_EVENT,                     /* every event of the rollout, as it happens */
  WEBHOOK_TYPE_COUNT
} webhook_type;

#define WEBHOOK_DEFAULT_TIMEOUT 10.0
#define WEBHOOK_DEFAULT_RETRIES 2
#define WEBHOOK_DEFAULT_INTERVAL 10.0
#define WEBHOOK_MAX_RETRIES 10
#define WEBHOOK_MAX 32             /* per declaration, and per rollout once merged */

typedef struct webhook {
  char name[64];
  webhook_type type;
  char url[2048];          /* expanded: may hold a secret (a Slack-style URL) */
  char secret[512];        /* expanded; "" unsigned */
  double timeout;          /* seconds per attempt */
  int retries;             /* attempts after the first (pre-rollout, rollout, post-rollout, event) */
  double interval;         /* seconds between asks of a waiting gate (confirm-*) */
} webhook;

typedef struct webhook_list {
  webhook *v;
  size_t n;
} webhook_list;

/* A declaration as given (Lua table or JSON object): NULL, or NAN for a
 * number, where nothing was given. */
typedef struct webhook_spec {
  const char *name;
  const char *type;
  const char *url;
  const char *secret;
  double timeout;
  double retries;          /* a number: 1.5 is refused */
  double interval;
} webhook_spec;

/* Where a declaration comes from: a manifest is written by whoever can
 * push to the repository, so it may name an environment variable only as
 * a whole secret ("${HOOK_SECRET}"), never inside a URL (which would send
 * the value anywhere), and never hold a secret in clear. */
typedef enum { WEBHOOK_TRUSTED, WEBHOOK_FROM_GIT } webhook_origin;

const char *webhook_type_name(webhook_type t);
/* 1 for the confirm-* kinds: they hold the rollout until answered 2xx. */
int webhook_is_gate(webhook_type t);

/* Where and how to send (url, secret, timeout, retries: NULL or NAN when
 * not given), checked and expanded into w as webhook_add does: shared by
 * webhooks and notifications. -1 with field and err filled. */
int webhook_endpoint(webhook *w, const char *url, const char *secret, double timeout, double retries,
                     webhook_origin origin, char *field, size_t fsize, char *err);

/* Checks s, expands ${NAME} (registering the values as secrets, and the
 * secret itself), and appends it to l. -1 with field ("type", "url", ...,
 * or "" for the declaration as a whole) and err (what is wrong and the
 * fix, to read after the field's name) filled; l is unchanged then. */
int webhook_add(webhook_list *l, const webhook_spec *s, webhook_origin origin, char *field, size_t fsize,
                char *err);
/* A JSON array of declarations (a manifest's strategy.webhooks): -1 with
 * field ("webhooks[2].url") and err filled, *out empty. */
int webhook_list_from_json(webhook_list *out, const json_t *arr, webhook_origin origin, char *field, size_t fsize,
                           char *err);
/* out = base with over's entries added; one of over's replaces base's of
 * the same name (a strategy's or a manifest's hook overrides the
 * target's). -1 with err when the result would pass WEBHOOK_MAX or memory
 * runs out. */
int webhook_list_merge(webhook_list *out, const webhook_list *base, const webhook_list *over, char *err);
int webhook_list_copy(webhook_list *out, const webhook_list *from);
void webhook_list_clear(webhook_list *l); /* the secrets are wiped */

/* ---- delivery ---- */

/* The outcome of one delivery (every attempt included). */
typedef struct webhook_answer {
  int ok;                  /* answered 2xx */
  long status;             /* the last answer's status, 0 without one */
  httpreq_error error;     /* of the last attempt */
  int attempts;
  char detail[DC_ERR_MAX]; /* "status 503: <body excerpt>", "timeout after 5 s", ... */
} webhook_answer;

typedef void (*webhook_done_cb)(void *payload, const webhook_answer *a);
typedef struct webhook_call webhook_call;

/* POSTs body (JSON, sent as it is) to w->url with w->timeout, signed
 * when w has a secret, up to 1 + attempts_after times (waiting 1 s, 2 s,
 * ... at most 5 s between attempts, on the engine clock) until an answer
 * is 2xx. label, when given, is sent as X-Deploy-Webhook (the kind). cb
 * runs once, from the loop. Returns NULL (and cb never runs) only when
 * memory runs out. w is copied; body is borrowed. */
webhook_call *webhook_call_start(engine *e, const webhook *w, const char *label, const json_t *body,
                                 int attempts_after, webhook_done_cb cb, void *cb_payload);
/* cb never runs. NULL-safe. */
void webhook_call_cancel(webhook_call *c);

#endif
