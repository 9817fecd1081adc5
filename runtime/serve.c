/* serve: the life cycle, the views kept fresh by polling the store, and
 * the event stream (server-sent events) of the dashboard. */
#include "serve.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "describe.h"
#include "json.h"
#include "serve_int.h"
#include "util.h"

const double serve_buckets[SERVE_NBUCKETS] = {5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200};

serve_target *serve_find(serve *s, const char *name) {
  for (size_t i = 0; i < s->n; i++)
    if (strcmp(s->targets[i].t->name, name) == 0)
      return &s->targets[i];
  return NULL;
}

/* ---- stop and free ---- */

static void free_serve(serve *s) {
  for (size_t i = 0; i < s->n; i++) {
    json_decref(s->targets[i].view);
    json_decref(s->targets[i].verdicts);
  }
  free(s->targets);
  serve_repos_free(s);
  if (s->token)
    explicit_bzero(s->token, strlen(s->token));
  free(s->token);
  while (s->clients) {
    serve_client *c = s->clients;
    s->clients = c->next;
    free(c);
  }
  service_unref(s->svc);
  free(s);
}

static void maybe_done(serve *s) {
  if (!s->stopping || s->inflight > 0 || s->timers_open > 0 || s->httpd_open)
    return;
  void (*done)(void *) = s->done;
  void *payload = s->done_payload;
  free_serve(s);
  if (done)
    done(payload);
}

void serve_hold(serve *s) { s->inflight++; }

void serve_release(serve *s) {
  s->inflight--;
  maybe_done(s);
}

static void timer_closed(uv_handle_t *h) {
  serve *s = h->data;
  s->timers_open--;
  maybe_done(s);
}

static void httpd_closed(void *payload) {
  serve *s = payload;
  s->httpd_open = 0;
  maybe_done(s);
}

void serve_stop(serve *s, void (*done)(void *payload), void *payload) {
  if (!s || s->stopping)
    return;
  s->stopping = 1;
  s->done = done;
  s->done_payload = payload;
  for (serve_client *c = s->clients; c; c = c->next) {
    if (!c->gone)
      s->api->stream_close(c->stream);
    c->gone = 1;
  }
  supervise_stop(s->sv);
  s->sv = NULL;
  serve_repos_stop(s);
  uv_timer_stop(&s->poll_timer);
  uv_timer_stop(&s->ping_timer);
  uv_close((uv_handle_t *)&s->poll_timer, timer_closed);
  uv_close((uv_handle_t *)&s->ping_timer, timer_closed);
  if (s->h && s->httpd_open)
    s->api->stop(s->h, httpd_closed, s);
  maybe_done(s);
}

int serve_port(const serve *s) { return s->h ? s->api->port(s->h) : 0; }

/* ---- the event stream ---- */

static void client_gone(void *payload) {
  serve_client *c = payload;
  c->gone = 1;
}

static void prune_clients(serve *s) {
  serve_client **p = &s->clients;
  while (*p) {
    if ((*p)->gone) {
      serve_client *dead = *p;
      *p = dead->next;
      free(dead);
    } else {
      p = &(*p)->next;
    }
  }
}

static void write_all(serve *s, const char *text, size_t len) {
  for (serve_client *c = s->clients; c; c = c->next) {
    if (c->gone)
      continue;
    /* A client too far behind (or gone) is dropped: it reconnects and
     * starts again from a snapshot. */
    if (s->api->stream_write(c->stream, text, len) != 0) {
      c->gone = 1;
      s->api->stream_close(c->stream);
    }
  }
  prune_clients(s);
}

static char *frame(const char *kind, const json_t *data) {
  char *text = dc_json_dump(data);
  if (!text)
    return NULL;
  dc_buf b = {0};
  dc_buf_printf(&b, "event: %s\ndata: %s\n\n", kind, text);
  free(text);
  return dc_buf_take(&b);
}

void serve_broadcast(serve *s, const char *kind, const json_t *data) {
  if (!s->clients)
    return;
  char *text = frame(kind, data);
  if (text)
    write_all(s, text, strlen(text));
  free(text);
}

static void ping(uv_timer_t *h) {
  serve *s = h->data;
  static const char comment[] = ": ping\n\n";
  write_all(s, comment, sizeof comment - 1);
}

void serve_stream_open(serve *s, httpd_req *req) {
  serve_client *c = calloc(1, sizeof *c);
  if (!c) {
    serve_reply_error(s, req, 503, "serve: out of memory");
    return;
  }
  c->stream = s->api->stream_open(req, "text/event-stream; charset=utf-8", client_gone, c);
  if (!c->stream) {
    free(c);
    return;
  }
  c->next = s->clients;
  s->clients = c;
  /* A snapshot first: every target as it is now. */
  dc_buf b = {0};
  dc_buf_puts(&b, "retry: 2000\n\n");
  for (size_t i = 0; i < s->n; i++) {
    if (!s->targets[i].view)
      continue;
    char *f = frame("target", s->targets[i].view);
    if (f)
      dc_buf_puts(&b, f);
    free(f);
  }
  if (b.len && s->api->stream_write(c->stream, b.data, b.len) != 0) {
    c->gone = 1;
    s->api->stream_close(c->stream);
  }
  dc_buf_free(&b);
}

/* ---- polling: views, the timeline, the history counts ---- */

typedef struct poll_req {
  serve *s;
  serve_target *st;
  char dep[48];
  int reset;
} poll_req;

static void poll_done(poll_req *p) {
  p->st->polling = 0;
  serve *s = p->s;
  free(p);
  serve_release(s);
}

static void count_finished(serve_target *st, const store_deployment *d) {
  if (strcmp(d->status, "running") == 0 || d->seq <= st->max_seq)
    return;
  st->max_seq = d->seq;
  int k = strcmp(d->status, "succeeded") == 0 ? 0 : strcmp(d->status, "failed") == 0 ? 1 : 2;
  st->results[k]++;
  st->durations_count++;
  st->durations_sum += d->duration;
  for (int i = 0; i < SERVE_NBUCKETS; i++)
    if (d->duration <= serve_buckets[i])
      st->buckets[i]++;
}

static void history_read(void *payload, const store_result *r) {
  poll_req *p = payload;
  serve_target *st = p->st;
  if (r->rc == DC_OK) {
    /* Oldest first, so max_seq moves forward; a deployment still running
     * is counted once it ends. */
    int64_t seen = st->max_seq;
    for (size_t i = r->ndeployments; i-- > 0;) {
      if (strcmp(r->deployments[i].status, "running") == 0)
        break;
      if (r->deployments[i].seq > seen)
        count_finished(st, &r->deployments[i]);
    }
    st->history_loaded = 1;
  }
  poll_done(p);
}

static void read_history(poll_req *p) {
  char err[DC_ERR_MAX];
  serve_target *st = p->st;
  const char *last = json_string_value(json_object_get(json_object_get(st->view, "last_deployment"), "id"));
  if (st->history_loaded && (!last || strcmp(last, st->last_seen_dep) == 0)) {
    poll_done(p);
    return;
  }
  dc_strlcpy(st->last_seen_dep, last ? last : "", sizeof st->last_seen_dep);
  /* All of it once; then the newest few (one deployment runs at a time
   * per target, so a few are always enough between two polls). */
  int limit = st->history_loaded ? 16 : 0;
  if (store_history(service_store(p->s->svc), st->t->name, limit, history_read, p, err) != 0)
    poll_done(p);
}

static void count_event(serve *s, serve_target *st, const store_event *ev) {
  if (ev->ts < s->started_at)
    return;
  if (strcmp(ev->kind, "health_failed") == 0) {
    st->health_failures++;
  } else if (view_is_analysis(ev->kind) && ev->data) {
    json_t *data = json_loads(ev->data, 0, NULL);
    const char *verdict = view_analysis_verdict(data);
    if (verdict) {
      json_t *n = json_object_get(st->verdicts, verdict);
      json_object_set_new(st->verdicts, verdict, json_integer(json_integer_value(n) + 1));
    }
    json_decref(data);
  }
}

static void events_read(void *payload, const store_result *r) {
  poll_req *p = payload;
  serve *s = p->s;
  serve_target *st = p->st;
  if (r->rc == DC_OK && !s->stopping) {
    for (size_t i = 0; i < r->nevents; i++) {
      const store_event *ev = &r->events[i];
      if (ev->id <= st->cursor_id)
        continue;
      st->cursor_id = ev->id;
      count_event(s, st, ev);
      json_t *doc = serve_event_json(ev);
      serve_broadcast(s, "event", doc);
      json_decref(doc);
    }
  }
  read_history(p);
}

static void described(void *payload, const json_t *view, const char *err) {
  poll_req *p = payload;
  serve *s = p->s;
  serve_target *st = p->st;
  char e2[DC_ERR_MAX];
  if (!view || s->stopping) {
    if (!view && !s->stopping)
      fprintf(stderr, "deployctl serve: %s\n", err);
    poll_done(p);
    return;
  }
  int changed = !st->view || !json_equal(st->view, (json_t *)view);
  json_decref(st->view);
  st->view = json_deep_copy(view);
  if (changed)
    serve_broadcast(s, "target", st->view);
  json_t *ro = json_object_get(view, "rollout");
  const char *dep = json_string_value(json_object_get(json_is_object(ro) ? ro : json_object_get(view, "last_deployment"), "id"));
  if (!dep || (!changed && !json_is_object(ro) && strcmp(dep, st->cursor_dep) == 0)) {
    read_history(p);
    return;
  }
  dc_strlcpy(st->cursor_dep, dep, sizeof st->cursor_dep);
  dc_strlcpy(p->dep, dep, sizeof p->dep);
  if (store_events(service_store(s->svc), dep, events_read, p, e2) != 0)
    read_history(p);
}

static void poll_tick(uv_timer_t *h) {
  serve *s = h->data;
  char err[DC_ERR_MAX];
  for (size_t i = 0; i < s->n; i++) {
    serve_target *st = &s->targets[i];
    if (st->polling)
      continue;
    poll_req *p = calloc(1, sizeof *p);
    if (!p)
      return;
    p->s = s;
    p->st = st;
    st->polling = 1;
    serve_hold(s);
    describe_opts o = {.check = 0};
    if (service_describe(s->svc, st->t->name, &o, described, p, err) != DC_OK) {
      fprintf(stderr, "deployctl serve: %s\n", err);
      poll_done(p);
    }
  }
}

/* ---- start ---- */

static int is_loopback(const char *host) {
  return strncmp(host, "127.", 4) == 0 || strcmp(host, "::1") == 0 || strcmp(host, "localhost") == 0;
}

static char *dup_or_null(const char *v) { return v && *v ? strdup(v) : NULL; }

int serve_start(serve **out, service *svc, const serve_opts *o, char *err) {
  *out = NULL;
  if (!is_loopback(o->host) && (!o->token || !*o->token)) {
    dc_fmt(err, DC_ERR_MAX, "serve: --listen %s would open the API beyond this machine without a token: set "
           "DEPLOY_API_TOKEN (and give --tls-cert/--tls-key), or listen on 127.0.0.1", o->host);
    return DC_ERROR;
  }
  const httpd_api *api = httpd_load(err);
  if (!api)
    return DC_ERROR;
  serve *s = calloc(1, sizeof *s);
  if (!s) {
    dc_fmt(err, DC_ERR_MAX, "serve: out of memory");
    return DC_ERROR;
  }
  s->svc = service_ref(svc);
  s->e = service_engine(svc);
  s->api = api;
  dc_strlcpy(s->host, o->host, sizeof s->host);
  dc_strlcpy(s->version, o->version ? o->version : "", sizeof s->version);
  s->token = dup_or_null(o->token);
  s->poll = o->poll > 0 ? o->poll : 0.5;
  s->max_body = o->max_body ? o->max_body : SERVE_MAX_BODY;
  s->started_at = engine_now(s->e);
  /* From here on a failure goes through serve_stop: the handles made so
   * far close on the loop. */
  uv_timer_init(s->e->loop, &s->poll_timer);
  uv_timer_init(s->e->loop, &s->ping_timer);
  s->poll_timer.data = s->ping_timer.data = s;
  s->timers_open = 2;
  s->n = service_ntargets(svc);
  s->targets = calloc(s->n + 1, sizeof *s->targets);
  int oom = !s->targets;
  for (size_t i = 0; !oom && i < s->n; i++) {
    s->targets[i].t = service_target_at(svc, i);
    oom |= !(s->targets[i].verdicts = json_object());
  }
  if (oom)
    dc_fmt(err, DC_ERR_MAX, "serve: out of memory");
  int rc = oom ? -1 : serve_repos_start(s, o->repos, o->nrepos, err);
  if (rc == 0) {
    httpd_opts ho = {.host = o->host, .port = o->port, .tls_cert = o->tls_cert, .tls_key = o->tls_key,
                     .max_body = s->max_body, .handler = serve_handle, .payload = s};
    rc = api->start(&s->h, s->e->loop, &ho, err);
    s->httpd_open = rc == 0;
  }
  if (rc == 0 && o->supervise) {
    rc = supervise_start(&s->sv, svc, &o->supervision, err);
  }
  if (rc != 0) {
    serve_stop(s, NULL, NULL);
    return DC_ERROR;
  }
  uv_timer_start(&s->poll_timer, poll_tick, 0, (uint64_t)(s->poll * 1000));
  uv_timer_start(&s->ping_timer, ping, 15000, 15000);
  *out = s;
  return DC_OK;
}
