/* `deployctl serve`: one long-running process on the engine's loop that
 *   - answers the JSON API, the dashboard and /metrics over HTTP(S)
 *     (httpd.h: h2o in deploy-httpd.so),
 *   - keeps a view of every target (view.h) fresh by polling the store, so
 *     rollouts run by any process (a CLI, CI, a GitOps sync here) show up,
 *     and pushes changes and events to the dashboard (server-sent events),
 *   - receives push webhooks from git hosts and has the matching GitOps
 *     repositories synced at once,
 *   - supervises the live instances of every target (supervise.h).
 *
 * Reading requests are answered from the views in memory: a thousand
 * requests a second cost the store nothing, and a rollout's steps do not
 * wait for them. Requests that change state (promote, abort, a sync) need
 * the API token. */
#ifndef DEPLOY_SERVE_H
#define DEPLOY_SERVE_H

#include <stddef.h>

#include "gitsync.h"
#include "service.h"
#include "supervise.h"

typedef struct serve serve;

/* A watched repository: serve runs its GitOps rounds (a poll every
 * interval, backing off after failures, as `deployctl watch` does) and
 * one at once when a verified push webhook names it. */
typedef struct serve_repo {
  gitsync *gs;                  /* borrowed: must outlive the serve */
  const char *secret;           /* webhook secret; NULL or "": webhooks for it are refused */
} serve_repo;

typedef struct serve_opts {
  const char *host;             /* numeric, "127.0.0.1" */
  int port;                     /* 9753; 0 any */
  const char *tls_cert, *tls_key; /* both or neither */
  const char *token;            /* DEPLOY_API_TOKEN; NULL/"": nothing may change state over HTTP */
  const serve_repo *repos;
  size_t nrepos;
  double poll;                  /* seconds between store polls (0.5) */
  int supervise;                /* restart dead live instances (supervise.h) */
  supervise_opts supervision;   /* zeros: the defaults */
  size_t max_body;              /* bytes; larger requests get 413 (1 MiB) */
  const char *version;          /* deployctl's, for /api/v1/status */
} serve_opts;

#define SERVE_DEFAULT_PORT 9753
#define SERVE_MAX_BODY (1024 * 1024)

/* Loads the HTTP module, listens, starts polling and supervising. -1
 * with err (the address in use, a bad certificate, a public address
 * without a token). */
int serve_start(serve **out, service *svc, const serve_opts *o, char *err);
int serve_port(const serve *s);
/* Stops listening, ends every stream and the supervision; done once all
 * is closed (the serve is freed then). */
void serve_stop(serve *s, void (*done)(void *payload), void *payload);

#endif
