/* serve's routes: the dashboard, /metrics, the JSON API (README "The
 * API"), and the way to the webhooks. Reads of the views are answered
 * from memory; history, deployments and events are read from the store;
 * promote and abort need the token. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dashboard_html.h"
#include "hmac.h"
#include "json.h"
#include "serve_int.h"
#include "util.h"

/* ---- answers ---- */

void serve_reply_json(serve *s, httpd_req *req, int status, json_t *doc) {
  char *text = doc ? dc_json_dump(doc) : NULL;
  json_decref(doc);
  if (!text) {
    static const char oom[] = "{\"error\":\"serve: out of memory\"}";
    s->api->respond(req, 503, "application/json", NULL, oom, sizeof oom - 1);
    return;
  }
  static const char *const headers[] = {"cache-control", "no-store", NULL};
  size_t len = strlen(text);
  text[len] = '\0';
  s->api->respond(req, status, "application/json", headers, text, len);
  free(text);
}

void serve_reply_error(serve *s, httpd_req *req, int status, const char *fmt, ...) {
  char msg[DC_ERR_MAX];
  va_list ap;
  va_start(ap, fmt);
  dc_vfmt(msg, sizeof msg, fmt, ap);
  va_end(ap);
  serve_reply_json(s, req, status, json_pack("{s:o}", "error", dc_json_text(msg)));
}

static void reply_text(serve *s, httpd_req *req, int status, const char *type, const char *text) {
  s->api->respond(req, status, type, NULL, text, strlen(text));
}

/* ---- JSON of rows ---- */

static json_t *iso(double t) {
  char buf[40];
  if (t <= 0)
    return json_null();
  dc_iso8601(t, buf, sizeof buf);
  return json_string(buf);
}

static json_t *parsed(const char *text) {
  json_t *v = text ? json_loads(text, 0, NULL) : NULL;
  return v ? v : json_null();
}

json_t *serve_event_json(const store_event *ev) {
  return json_pack("{s:I, s:s, s:s, s:s, s:o, s:o, s:o}", "id", (json_int_t)ev->id, "deployment_id", ev->deployment_id,
                   "target", ev->target, "kind", ev->kind, "ts", json_real(ev->ts), "time", iso(ev->ts), "data",
                   parsed(ev->data));
}

static json_t *deployment_json(const store_deployment *d) {
  return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:o, s:o, s:o, s:o, s:s, s:s, s:i}", "id", d->id,
                   "target", d->target, "version", d->version, "from_version", d->from_version, "kind", d->kind,
                   "strategy", d->strategy, "status", d->status, "created_at", iso(d->created_at), "finished_at",
                   iso(d->finished_at), "duration", dc_json_number(dc_round_ms(d->duration)), "errors",
                   parsed(d->errors), "metadata", parsed(d->metadata), "user", d->user, "host", d->owner_host,
                   "pid", d->owner_pid);
}

/* ---- store reads answered later ---- */

typedef struct pending {
  serve *s;
  httpd_req *req;
  char target[64];
  char command[16];
  char want[48];           /* promote/abort: the deployment the caller saw */
  int events;              /* deployments/{id}/events */
} pending;

static pending *pending_new(serve *s, httpd_req *req) {
  pending *p = calloc(1, sizeof *p);
  if (!p) {
    serve_reply_error(s, req, 503, "serve: out of memory");
    return NULL;
  }
  p->s = s;
  p->req = req;
  serve_hold(s);
  return p;
}

static void pending_end(pending *p) {
  serve *s = p->s;
  free(p);
  serve_release(s);
}

static int store_status(int rc) {
  return rc == DC_NOTFOUND ? 404 : rc == DC_AMBIGUOUS ? 400 : rc == DC_LOCKED ? 409 : 500;
}

static void history_read(void *payload, const store_result *r) {
  pending *p = payload;
  if (r->rc != DC_OK) {
    serve_reply_error(p->s, p->req, store_status(r->rc), "%s", r->err);
  } else {
    json_t *list = json_array();
    for (size_t i = 0; i < r->ndeployments; i++)
      json_array_append_new(list, deployment_json(&r->deployments[i]));
    serve_reply_json(p->s, p->req, 200, json_pack("{s:s, s:o}", "target", p->target, "deployments", list));
  }
  pending_end(p);
}

static void events_read(void *payload, const store_result *r) {
  pending *p = payload;
  if (r->rc != DC_OK) {
    serve_reply_error(p->s, p->req, store_status(r->rc), "%s", r->err);
  } else {
    json_t *list = json_array();
    for (size_t i = 0; i < r->nevents; i++)
      json_array_append_new(list, serve_event_json(&r->events[i]));
    serve_reply_json(p->s, p->req, 200, json_pack("{s:s, s:o}", "deployment_id", p->want, "events", list));
  }
  pending_end(p);
}

static void deployment_read(void *payload, const store_result *r) {
  pending *p = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK || r->ndeployments == 0) {
    if (r->rc == DC_OK)
      serve_reply_error(p->s, p->req, 404, "serve: '%s' has no deployment yet", p->target);
    else
      serve_reply_error(p->s, p->req, store_status(r->rc), "%s", r->err);
    pending_end(p);
    return;
  }
  if (!p->events) {
    serve_reply_json(p->s, p->req, 200, deployment_json(&r->deployments[0]));
    pending_end(p);
    return;
  }
  dc_strlcpy(p->want, r->deployments[0].id, sizeof p->want);
  if (store_events(service_store(p->s->svc), p->want, events_read, p, err) != 0) {
    serve_reply_error(p->s, p->req, 500, "%s", err);
    pending_end(p);
  }
}

static void controlled(void *payload, int ok, int locked, const char *err) {
  pending *p = payload;
  if (!ok)
    serve_reply_error(p->s, p->req, 409, "%s", err ? err : "refused");
  else
    serve_reply_json(p->s, p->req, 202, json_pack("{s:s, s:s, s:b}", "target", p->target, "command", p->command,
                                                  "requested", 1));
  pending_end(p);
}

/* promote/abort for exactly the deployment the caller saw, when it says
 * which: the newest of the target must be it, and running. */
static void newest_read(void *payload, const store_result *r) {
  pending *p = payload;
  char err[DC_ERR_MAX];
  if (r->rc != DC_OK) {
    serve_reply_error(p->s, p->req, 500, "%s", r->err);
    pending_end(p);
    return;
  }
  const store_deployment *d = r->ndeployments ? &r->deployments[0] : NULL;
  if (p->want[0] && (!d || strncmp(d->id, p->want, strlen(p->want)) != 0 || strcmp(d->status, "running") != 0)) {
    serve_reply_error(p->s, p->req, 409, "serve: %s: deployment '%s' is not the one running on '%s' (%s): nothing done",
                      p->command, p->want, p->target, d && strcmp(d->status, "running") == 0 ? d->id : "none runs");
    pending_end(p);
    return;
  }
  if (service_control(p->s->svc, p->target, p->command, controlled, p, err) != DC_OK) {
    serve_reply_error(p->s, p->req, 500, "%s", err);
    pending_end(p);
  }
}

/* ---- the token ---- */

/* 1 when the request may change state; else answered (401/403). */
static int authorized(serve *s, httpd_req *req) {
  if (!s->token) {
    serve_reply_error(s, req, 403, "serve: this server was started without DEPLOY_API_TOKEN: nothing may change "
                      "state over HTTP; restart it with DEPLOY_API_TOKEN set");
    return 0;
  }
  size_t len = 0;
  const char *h = s->api->header(req, "authorization", &len);
  char given[512] = "";
  if (h && len > 7 && len < sizeof given + 7 && strncasecmp(h, "Bearer ", 7) == 0)
    dc_fmt(given, sizeof given, "%.*s", (int)(len - 7), h + 7);
  int ok = given[0] && dc_equal_secret(given, s->token);
  explicit_bzero(given, sizeof given);
  if (!ok) {
    static const char *const hs[] = {"www-authenticate", "Bearer realm=\"deployctl\"", "cache-control", "no-store",
                                     NULL};
    static const char body[] = "{\"error\":\"serve: this request changes state: send the API token as "
                               "'Authorization: Bearer <DEPLOY_API_TOKEN>'\"}";
    s->api->respond(req, 401, "application/json", hs, body, sizeof body - 1);
  }
  return ok;
}

/* ---- routes ---- */

#define MAX_SEGS 8

typedef struct route {
  const char *seg[MAX_SEGS];
  char buf[1024];
  int n;
} route;

/* "/api/v1/status/prod" -> api, v1, status, prod. -1 when it has empty
 * segments, too many, or is too long. */
static int split(const char *path, route *rt) {
  rt->n = 0;
  if (strlen(path) >= sizeof rt->buf || path[0] != '/')
    return -1;
  dc_strlcpy(rt->buf, path + 1, sizeof rt->buf);
  if (!rt->buf[0])
    return 0;
  char *p = rt->buf;
  for (;;) {
    if (rt->n == MAX_SEGS)
      return -1;
    rt->seg[rt->n++] = p;
    char *slash = strchr(p, '/');
    if (!slash)
      break;
    *slash = '\0';
    p = slash + 1;
    if (!*p)
      break; /* a trailing slash */
  }
  for (int i = 0; i < rt->n; i++)
    if (!rt->seg[i][0])
      return -1;
  return 0;
}

static int is(const route *rt, int i, const char *s) { return i < rt->n && strcmp(rt->seg[i], s) == 0; }

/* The value of `key` in a query string (not decoded: names and ids need
 * none), "" when absent; -1 when it is too long. */
static int query_get(const char *query, const char *key, char *out, size_t size) {
  size_t k = strlen(key);
  out[0] = '\0';
  for (const char *p = query; p && *p;) {
    const char *amp = strchr(p, '&');
    size_t len = amp ? (size_t)(amp - p) : strlen(p);
    if (len > k && strncmp(p, key, k) == 0 && p[k] == '=') {
      if (len - k - 1 >= size)
        return -1;
      dc_fmt(out, size, "%.*s", (int)(len - k - 1), p + k + 1);
      return 0;
    }
    p = amp ? amp + 1 : NULL;
  }
  return 0;
}

static int method_is(const httpd_request *r, const char *m) { return strcmp(r->method, m) == 0; }

static int wrong_method(serve *s, httpd_req *req, const httpd_request *r, const char *allowed) {
  const char *hs[] = {"allow", allowed, NULL};
  char body[256];
  dc_fmt(body, sizeof body, "{\"error\":\"serve: %s is not allowed on %s: use %s\"}",
         strlen(r->method) < 16 ? r->method : "this method", strlen(r->path) < 100 ? r->path : "this path", allowed);
  s->api->respond(req, 405, "application/json", hs, body, strlen(body));
  return 1;
}

static serve_target *target_or_404(serve *s, httpd_req *req, const char *name) {
  serve_target *st = serve_find(s, name);
  if (!st) {
    char *known = service_known(s->svc);
    serve_reply_error(s, req, 404, "serve: unknown target '%.64s' (known: %s)", name, known ? known : "");
    free(known);
  }
  return st;
}

static void api_status(serve *s, httpd_req *req, const route *rt) {
  if (rt->n == 4) {
    serve_target *st = target_or_404(s, req, rt->seg[3]);
    if (!st)
      return;
    if (!st->view) {
      serve_reply_error(s, req, 503, "serve: '%s' was not read yet: ask again in a moment", rt->seg[3]);
      return;
    }
    serve_reply_json(s, req, 200, json_incref(st->view));
    return;
  }
  json_t *targets = json_array();
  for (size_t i = 0; i < s->n; i++)
    if (s->targets[i].view)
      json_array_append(targets, s->targets[i].view);
  char started[40];
  dc_iso8601(s->started_at, started, sizeof started);
  serve_reply_json(s, req, 200,
                   json_pack("{s:o, s:{s:s, s:s, s:b, s:o}}", "targets", targets, "serve", "version", s->version,
                             "started_at", started, "token", s->token != NULL, "gitops", serve_repos_json(s)));
}

static void api_history(serve *s, httpd_req *req, const httpd_request *r, const char *target) {
  char limit_s[16], err[DC_ERR_MAX];
  if (!target_or_404(s, req, target))
    return;
  long limit = 50;
  if (query_get(r->query, "limit", limit_s, sizeof limit_s) != 0)
    limit_s[0] = 'x';
  if (limit_s[0]) {
    char *end;
    limit = strtol(limit_s, &end, 10);
    if (*end || limit < 1 || limit > 1000) {
      serve_reply_error(s, req, 400, "serve: limit must be a whole number from 1 to 1000, got '%.15s'", limit_s);
      return;
    }
  }
  pending *p = pending_new(s, req);
  if (!p)
    return;
  dc_strlcpy(p->target, target, sizeof p->target);
  if (store_history(service_store(s->svc), target, (int)limit, history_read, p, err) != 0) {
    serve_reply_error(s, req, 500, "%s", err);
    pending_end(p);
  }
}

static void api_deployment(serve *s, httpd_req *req, const httpd_request *r, const route *rt) {
  char err[DC_ERR_MAX], target[80];
  const char *id = rt->seg[3];
  int events = rt->n == 5;
  if (strlen(id) > 47) {
    serve_reply_error(s, req, 400, "serve: a deployment id has at most 47 characters");
    return;
  }
  if (strcmp(id, "latest") == 0) {
    if (query_get(r->query, "target", target, sizeof target) != 0 || !target[0]) {
      serve_reply_error(s, req, 400, "serve: 'latest' needs the target: /api/v1/deployments/latest?target=NAME");
      return;
    }
    if (!target_or_404(s, req, target))
      return;
  }
  pending *p = pending_new(s, req);
  if (!p)
    return;
  p->events = events;
  int rc;
  if (strcmp(id, "latest") == 0) {
    dc_strlcpy(p->target, target, sizeof p->target);
    rc = store_history(service_store(s->svc), target, 1, deployment_read, p, err);
  } else {
    rc = store_deployment_get(service_store(s->svc), id, deployment_read, p, err);
  }
  if (rc != 0) {
    serve_reply_error(s, req, 500, "%s", err);
    pending_end(p);
  }
}

/* The optional body of promote/abort: {} or {"deployment_id": "..."}. */
static int read_control_body(serve *s, httpd_req *req, const httpd_request *r, char *want, size_t size) {
  char err[DC_ERR_MAX];
  want[0] = '\0';
  if (r->body_len == 0)
    return 0;
  json_t *doc = dc_json_parse(r->body, r->body_len, err, sizeof err);
  if (!doc) {
    serve_reply_error(s, req, 400, "serve: the body is not JSON (%s): send {} or {\"deployment_id\": \"...\"}", err);
    return -1;
  }
  if (!json_is_object(doc)) {
    json_decref(doc);
    serve_reply_error(s, req, 400, "serve: the body must be a JSON object: {} or {\"deployment_id\": \"...\"}");
    return -1;
  }
  const char *key;
  json_t *v;
  json_object_foreach(doc, key, v) {
    if (strcmp(key, "deployment_id") != 0 || !json_is_string(v) || json_string_length(v) == 0 ||
        json_string_length(v) >= size) {
      char shown[64];
      dc_fmt(shown, sizeof shown, "%.40s", key);
      json_decref(doc);
      if (strcmp(shown, "deployment_id") == 0)
        serve_reply_error(s, req, 400, "serve: deployment_id must be a deployment id (a string of 1 to 47 characters)");
      else
        serve_reply_error(s, req, 400, "serve: unknown field '%s' in the body (known: deployment_id)", shown);
      return -1;
    }
  }
  dc_strlcpy(want, json_string_value(json_object_get(doc, "deployment_id")), size);
  json_decref(doc);
  return 0;
}

static void api_control(serve *s, httpd_req *req, const httpd_request *r, const char *target, const char *command) {
  char want[48], err[DC_ERR_MAX];
  if (!authorized(s, req))
    return;
  if (!target_or_404(s, req, target) || read_control_body(s, req, r, want, sizeof want) != 0)
    return;
  pending *p = pending_new(s, req);
  if (!p)
    return;
  dc_strlcpy(p->target, target, sizeof p->target);
  dc_strlcpy(p->command, command, sizeof p->command);
  dc_strlcpy(p->want, want, sizeof p->want);
  if (store_history(service_store(s->svc), target, 1, newest_read, p, err) != 0) {
    serve_reply_error(s, req, 500, "%s", err);
    pending_end(p);
  }
}

static void api_sync(serve *s, httpd_req *req) {
  if (!authorized(s, req))
    return;
  if (s->nrepos == 0) {
    serve_reply_error(s, req, 404, "serve: the config has no gitops repositories to sync (gitops = { { repo_url = "
                      "... } })");
    return;
  }
  for (size_t i = 0; i < s->nrepos; i++)
    serve_repo_sync_now(s, i);
  s->syncs_requested++;
  serve_reply_json(s, req, 202, json_pack("{s:b, s:i}", "syncing", 1, "repositories", (int)s->nrepos));
}

static void not_found(serve *s, httpd_req *req, const httpd_request *r) {
  serve_reply_error(s, req, 404, "serve: no such route: %.16s %.120s (the API is under /api/v1: status, targets/NAME/"
                    "history, deployments/ID, deployments/ID/events, stream, targets/NAME/promote|abort, sync)",
                    r->method, r->path);
}

static void api(serve *s, httpd_req *req, const httpd_request *r, const route *rt) {
  if (is(rt, 2, "status") && rt->n <= 4) {
    if (!method_is(r, "GET"))
      wrong_method(s, req, r, "GET");
    else
      api_status(s, req, rt);
  } else if (is(rt, 2, "stream") && rt->n == 3) {
    if (!method_is(r, "GET"))
      wrong_method(s, req, r, "GET");
    else
      serve_stream_open(s, req);
  } else if (is(rt, 2, "deployments") && (rt->n == 4 || (rt->n == 5 && is(rt, 4, "events")))) {
    if (!method_is(r, "GET"))
      wrong_method(s, req, r, "GET");
    else
      api_deployment(s, req, r, rt);
  } else if (is(rt, 2, "targets") && rt->n == 5 && is(rt, 4, "history")) {
    if (!method_is(r, "GET"))
      wrong_method(s, req, r, "GET");
    else
      api_history(s, req, r, rt->seg[3]);
  } else if (is(rt, 2, "targets") && rt->n == 5 && (is(rt, 4, "promote") || is(rt, 4, "abort"))) {
    if (!method_is(r, "POST"))
      wrong_method(s, req, r, "POST");
    else
      api_control(s, req, r, rt->seg[3], rt->seg[4]);
  } else if (is(rt, 2, "sync") && rt->n == 3) {
    if (!method_is(r, "POST"))
      wrong_method(s, req, r, "POST");
    else
      api_sync(s, req);
  } else {
    not_found(s, req, r);
  }
}

void serve_handle(void *payload, httpd_req *req, const httpd_request *r) {
  serve *s = payload;
  route rt;
  s->requests++;
  if (s->stopping) {
    serve_reply_error(s, req, 503, "serve: stopping");
    return;
  }
  if (split(r->path, &rt) != 0) {
    serve_reply_error(s, req, 400, "serve: malformed path");
    return;
  }
  if (rt.n == 0) {
    if (!method_is(r, "GET") && !method_is(r, "HEAD")) {
      wrong_method(s, req, r, "GET");
      return;
    }
    static const char *const hs[] = {"content-security-policy",
                                     "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                     "img-src data:; connect-src 'self'",
                                     "x-content-type-options", "nosniff", "cache-control", "no-store", NULL};
    s->api->respond(req, 200, "text/html; charset=utf-8", hs, (const char *)dashboard_html,
                    sizeof dashboard_html - 1);
  } else if (rt.n == 1 && is(&rt, 0, "metrics")) {
    if (!method_is(r, "GET"))
      wrong_method(s, req, r, "GET");
    else {
      char *text = serve_metrics_text(s);
      if (text)
        reply_text(s, req, 200, "text/plain; version=0.0.4; charset=utf-8", text);
      else
        serve_reply_error(s, req, 503, "serve: out of memory");
      free(text);
    }
  } else if (rt.n == 1 && is(&rt, 0, "healthz")) {
    reply_text(s, req, 200, "text/plain; charset=utf-8", "ok\n");
  } else if (rt.n == 2 && is(&rt, 0, "hooks") &&
             (is(&rt, 1, "github") || is(&rt, 1, "gitlab") || is(&rt, 1, "generic"))) {
    if (!method_is(r, "POST"))
      wrong_method(s, req, r, "POST");
    else
      serve_webhook(s, req, r, rt.seg[1]);
  } else if (rt.n >= 3 && is(&rt, 0, "api") && is(&rt, 1, "v1")) {
    api(s, req, r, &rt);
  } else {
    not_found(s, req, r);
  }
}
