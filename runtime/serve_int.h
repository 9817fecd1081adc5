/* What the parts of `deployctl serve` share: serve.c (life cycle, the
 * views it polls, the event stream), serve_api.c (routes and the JSON
 * API), serve_hooks.c (push webhooks in), metrics.c (/metrics). Not for
 * anyone else. */
#ifndef DEPLOY_SERVE_INT_H
#define DEPLOY_SERVE_INT_H

#include <stdint.h>

#include <jansson.h>

#include "httpd.h"
#include "serve.h"
#include "supervise.h"

/* Rollout durations are counted into these buckets (seconds). */
#define SERVE_NBUCKETS 10
extern const double serve_buckets[SERVE_NBUCKETS];

typedef struct serve_target {
  target_config *t;
  json_t *view;              /* the newest view, NULL before the first poll */
  int polling;
  /* the timeline: events of this deployment sent up to this id */
  char cursor_dep[48];
  int64_t cursor_id;
  /* counters since serve started, from the events it saw */
  long health_failures;
  json_t *verdicts;          /* verdict -> count */
  /* finished deployments, from the history */
  int history_loaded;
  int64_t max_seq;
  char last_seen_dep[48];
  long results[3];           /* succeeded, failed, interrupted */
  long buckets[SERVE_NBUCKETS];
  long durations_count;
  double durations_sum;
} serve_target;

/* A repository's rounds. */
typedef struct serve_repo_state {
  struct serve *s;
  size_t i;
  gitsync *gs;
  char *secret;              /* NULL: no webhooks */
  char url[1024], branch[256], path[1024];
  uv_timer_t timer;
  int timer_open;
  int running;               /* a round in flight */
  int again;                 /* a webhook came during it: one more */
  json_t *last;              /* the last round's summary */
  long rounds, failed;
} serve_repo_state;

typedef struct serve_client {
  httpd_stream *stream;
  int gone;
  struct serve_client *next;
} serve_client;

#define SERVE_DELIVERIES 1024

enum { HOOK_GITHUB, HOOK_GITLAB, HOOK_GENERIC, HOOK_KINDS };
enum { HOOK_ACCEPTED, HOOK_IGNORED, HOOK_UNAUTHORIZED, HOOK_REPLAYED, HOOK_BAD, HOOK_RESULTS };

struct serve {
  service *svc;
  engine *e;
  const httpd_api *api;
  httpd *h;
  char host[64];
  char *token;               /* NULL: none */
  serve_repo_state *repos;
  size_t nrepos;
  double poll;
  size_t max_body;
  char version[64];
  serve_target *targets;
  size_t n;
  serve_client *clients;
  uv_timer_t poll_timer, ping_timer;
  int timers_open;
  supervise *sv;
  double started_at;         /* engine clock */
  char deliveries[SERVE_DELIVERIES][80];
  size_t next_delivery;
  long hooks[HOOK_KINDS][HOOK_RESULTS];
  long syncs_requested;
  long requests;
  int stopping;
  int inflight;              /* store reads and answers in flight */
  int httpd_open;
  void (*done)(void *payload);
  void *done_payload;
};

/* serve.c */
serve_target *serve_find(serve *s, const char *name);
/* The event-stream frame "event: kind\ndata: json\n\n" to every client. */
void serve_broadcast(serve *s, const char *kind, const json_t *data);
/* A new client of /api/v1/stream (answers the request). */
void serve_stream_open(serve *s, httpd_req *req);
/* In-flight work, so that a stop waits for it. */
void serve_hold(serve *s);
void serve_release(serve *s);

/* serve_gitops.c: the rounds of each repository. */
int serve_repos_start(serve *s, const serve_repo *repos, size_t n, char *err);
void serve_repo_sync_now(serve *s, size_t i);
void serve_repos_stop(serve *s);      /* closes the timers (counted in timers_open) */
void serve_repos_free(serve *s);
json_t *serve_repos_json(serve *s);

/* serve_api.c: the httpd handler. */
void serve_handle(void *payload, httpd_req *req, const httpd_request *r);
void serve_reply_json(serve *s, httpd_req *req, int status, json_t *doc); /* takes doc */
void serve_reply_error(serve *s, httpd_req *req, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* An event row as the API shows it. */
json_t *serve_event_json(const store_event *ev);

/* serve_hooks.c: POST /hooks/{github,gitlab,generic}. */
void serve_webhook(serve *s, httpd_req *req, const httpd_request *r, const char *kind);

/* metrics.c: the Prometheus text of everything serve knows. Heap. */
char *serve_metrics_text(serve *s);

#endif
