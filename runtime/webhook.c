#include "webhook.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hmac.h"
#include "json.h"
#include "util.h"

static const char *const type_names[WEBHOOK_TYPE_COUNT] = {
    "confirm-rollout",   "pre-rollout",  "rollout", "confirm-traffic-increase", "confirm-promotion",
    "post-rollout",      "rollback",     "event"};

#define KNOWN_TYPES                                                                                                 \
  "confirm-rollout, pre-rollout, rollout, confirm-traffic-increase, confirm-promotion, post-rollout, rollback, "   \
  "event"

const char *webhook_type_name(webhook_type t) { return t < WEBHOOK_TYPE_COUNT ? type_names[t] : "webhook"; }

int webhook_is_gate(webhook_type t) {
  return t == WEBHOOK_CONFIRM_ROLLOUT || t == WEBHOOK_CONFIRM_TRAFFIC_INCREASE || t == WEBHOOK_CONFIRM_PROMOTION;
}

/* Attempts after the first make sense where one answer is waited for
 * once; a gate asks again every interval anyway, and a rollback hook is
 * asked at every step. */
static int takes_retries(webhook_type t) { return !webhook_is_gate(t) && t != WEBHOOK_ROLLBACK; }

/* ---- checking a declaration ---- */

static int fail(char *field, size_t fsize, const char *name, char *err, const char *msg) {
  dc_strlcpy(field, name, fsize);
  dc_strlcpy(err, msg, DC_ERR_MAX);
  return -1;
}

static int check_name(const char *name, char *field, size_t fsize, char *err) {
  char msg[DC_ERR_MAX];
  if (!name || !*name)
    return fail(field, fsize, "name", err, "is missing: give each webhook a name, e.g. name = \"qa-gate\"");
  size_t n = strlen(name);
  int ok = n < sizeof ((webhook *)0)->name;
  for (size_t i = 0; ok && i < n; i++)
    ok = isalnum((unsigned char)name[i]) || name[i] == '-' || name[i] == '_' || name[i] == '.';
  if (ok)
    return 0;
  char *shown = dc_printable(name);
  dc_fmt(msg, sizeof msg, "'%.80s' is not a usable name: at most 63 characters among A-Z a-z 0-9 . _ -",
         shown ? shown : "?");
  free(shown);
  return fail(field, fsize, "name", err, msg);
}

static int check_type(const char *type, webhook_type *out, char *field, size_t fsize, char *err) {
  char msg[DC_ERR_MAX];
  if (!type || !*type)
    return fail(field, fsize, "type", err, "is missing: add one of " KNOWN_TYPES);
  for (int i = 0; i < WEBHOOK_TYPE_COUNT; i++) {
    if (strcmp(type, type_names[i]) == 0) {
      *out = (webhook_type)i;
      return 0;
    }
  }
  char *shown = dc_printable(type);
  dc_fmt(msg, sizeof msg, "'%.64s' is not a webhook type (known: " KNOWN_TYPES ")", shown ? shown : "?");
  free(shown);
  return fail(field, fsize, "type", err, msg);
}

/* The runtime cannot parse URLs (libcurl is in the HTTP module): what is
 * checked here is what a typo breaks; the module refuses the rest when it
 * sends, and that is a failed delivery. */
static int url_usable(const char *url) {
  const char *rest = strncmp(url, "https://", 8) == 0 ? url + 8 : strncmp(url, "http://", 7) == 0 ? url + 7 : NULL;
  if (!rest || !*rest || *rest == '/' || *rest == ':')
    return 0;
  for (const unsigned char *c = (const unsigned char *)url; *c; c++)
    if (*c <= ' ' || *c == 0x7f)
      return 0;
  return 1;
}

static int check_url(webhook *w, const char *url, webhook_origin origin, char *field, size_t fsize, char *err) {
  char msg[DC_ERR_MAX], why[DC_ERR_MAX], shown[256];
  if (!url || !*url)
    return fail(field, fsize, "url", err, "is missing: add the receiver's URL, e.g. url = \"https://ci.example/hook\"");
  if (origin == WEBHOOK_FROM_GIT && strstr(url, "${"))
    return fail(field, fsize, "url", err,
                "may not name an environment variable in a manifest (it would send the value to whoever the "
                "URL names): write the URL itself, or declare the webhook on the target in the config");
  if (dc_expand_env(w->url, sizeof w->url, url, why) != 0)
    return fail(field, fsize, "url", err, dc_unprefix(why));
  if (dc_secret_note_refs(url) != 0)
    return fail(field, fsize, "url", err, "could not be registered as holding a secret: out of memory");
  if (url_usable(w->url))
    return 0;
  dc_redact_url(shown, sizeof shown, w->url);
  dc_redact(shown);
  char *p = dc_printable(shown);
  dc_fmt(msg, sizeof msg, "'%.200s' is not an http(s) URL: write http://host[:port]/path or https://...",
         p ? p : "?");
  free(p);
  return fail(field, fsize, "url", err, msg);
}

static int is_env_ref(const char *s) {
  size_t n = strlen(s);
  if (n < 4 || s[0] != '$' || s[1] != '{' || s[n - 1] != '}')
    return 0;
  for (size_t i = 2; i + 1 < n; i++)
    if (!(isalnum((unsigned char)s[i]) || s[i] == '_'))
      return 0;
  return !isdigit((unsigned char)s[2]);
}

static int check_secret(webhook *w, const char *secret, webhook_origin origin, char *field, size_t fsize,
                        char *err) {
  char why[DC_ERR_MAX];
  if (!secret)
    return 0;
  if (origin == WEBHOOK_FROM_GIT && !is_env_ref(secret))
    return fail(field, fsize, "secret", err,
                "must name an environment variable of deployctl's, e.g. \"${HOOK_SECRET}\": a secret committed "
                "to git is no secret");
  if (dc_expand_env(w->secret, sizeof w->secret, secret, why) != 0)
    return fail(field, fsize, "secret", err, dc_unprefix(why));
  if (!w->secret[0])
    return fail(field, fsize, "secret", err, "is empty: give the shared secret (e.g. \"${HOOK_SECRET}\"), or leave "
                                             "secret out to send unsigned");
  if (dc_secret_add(w->secret) != 0)
    return fail(field, fsize, "secret", err, "could not be registered as a secret: out of memory");
  return 0;
}

static int check_number(double v, double def, double lo, double hi, const char *name, const char *unit,
                        double *out, char *field, size_t fsize, char *err) {
  char msg[DC_ERR_MAX];
  if (isnan(v)) { /* not given */
    *out = def;
    return 0;
  }
  if (!(v >= lo && v <= hi)) {
    dc_fmt(msg, sizeof msg, "must be between %g and %g %s", lo, hi, unit);
    return fail(field, fsize, name, err, msg);
  }
  *out = v;
  return 0;
}

int webhook_endpoint(webhook *w, const char *url, const char *secret, double timeout, double retries,
                     webhook_origin origin, char *field, size_t fsize, char *err) {
  double n = 0;
  if (check_url(w, url, origin, field, fsize, err) || check_secret(w, secret, origin, field, fsize, err) ||
      check_number(timeout, WEBHOOK_DEFAULT_TIMEOUT, 0.001, HTTPREQ_MAX_TIMEOUT, "timeout", "seconds", &w->timeout,
                   field, fsize, err) ||
      check_number(retries, WEBHOOK_DEFAULT_RETRIES, 0, WEBHOOK_MAX_RETRIES, "retries", "attempts", &n, field, fsize,
                   err))
    return -1;
  if (n != floor(n))
    return fail(field, fsize, "retries", err, "must be a whole number of attempts");
  w->retries = (int)n;
  return 0;
}

int webhook_add(webhook_list *l, const webhook_spec *s, webhook_origin origin, char *field, size_t fsize,
                char *err) {
  char msg[DC_ERR_MAX];
  webhook w;
  memset(&w, 0, sizeof w);
  int rc = -1;
  if (l->n >= WEBHOOK_MAX) {
    dc_fmt(msg, sizeof msg, "holds more than %d webhooks: keep the list short", WEBHOOK_MAX);
    return fail(field, fsize, "", err, msg);
  }
  if (check_name(s->name, field, fsize, err) || check_type(s->type, &w.type, field, fsize, err))
    goto out;
  dc_strlcpy(w.name, s->name, sizeof w.name);
  for (size_t i = 0; i < l->n; i++) {
    if (strcmp(l->v[i].name, w.name) == 0) {
      dc_fmt(msg, sizeof msg, "'%s' is taken by another webhook of the list: names are unique", w.name);
      fail(field, fsize, "name", err, msg);
      goto out;
    }
  }
  if (webhook_endpoint(&w, s->url, s->secret, s->timeout, s->retries, origin, field, fsize, err) ||
      check_number(s->interval, WEBHOOK_DEFAULT_INTERVAL, 0.01, 86400, "interval", "seconds", &w.interval, field,
                   fsize, err))
    goto out;
  if (!isnan(s->retries) && !takes_retries(w.type)) {
    dc_fmt(msg, sizeof msg, "has no meaning for a %s webhook (%s): remove it", type_names[w.type],
           w.type == WEBHOOK_ROLLBACK ? "it is asked again at every step" : "a gate asks again every interval");
    fail(field, fsize, "retries", err, msg);
    goto out;
  }
  if (!isnan(s->interval) && !webhook_is_gate(w.type)) {
    dc_fmt(msg, sizeof msg, "is only for confirm-* webhooks (how often a waiting gate asks again): remove it "
           "from this %s webhook", type_names[w.type]);
    fail(field, fsize, "interval", err, msg);
    goto out;
  }
  webhook *g = realloc(l->v, (l->n + 1) * sizeof *g);
  if (!g) {
    fail(field, fsize, "", err, "could not be kept: out of memory");
    goto out;
  }
  l->v = g;
  l->v[l->n++] = w;
  rc = 0;
out:
  explicit_bzero(&w, sizeof w);
  return rc;
}

/* ---- lists ---- */

void webhook_list_clear(webhook_list *l) {
  if (!l)
    return;
  if (l->v)
    explicit_bzero(l->v, l->n * sizeof *l->v);
  free(l->v);
  l->v = NULL;
  l->n = 0;
}

int webhook_list_copy(webhook_list *out, const webhook_list *from) {
  out->v = NULL;
  out->n = 0;
  if (!from || from->n == 0)
    return 0;
  out->v = malloc(from->n * sizeof *out->v);
  if (!out->v)
    return -1;
  memcpy(out->v, from->v, from->n * sizeof *out->v);
  out->n = from->n;
  return 0;
}

int webhook_list_merge(webhook_list *out, const webhook_list *base, const webhook_list *over, char *err) {
  size_t cap = (base ? base->n : 0) + (over ? over->n : 0);
  out->v = NULL;
  out->n = 0;
  if (cap == 0)
    return 0;
  out->v = malloc(cap * sizeof *out->v);
  if (!out->v) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  for (size_t i = 0; base && i < base->n; i++)
    out->v[out->n++] = base->v[i];
  for (size_t i = 0; over && i < over->n; i++) {
    size_t k = 0;
    while (k < out->n && strcmp(out->v[k].name, over->v[i].name) != 0)
      k++;
    out->v[k] = over->v[i];
    if (k == out->n)
      out->n++;
  }
  if (out->n > WEBHOOK_MAX) {
    webhook_list_clear(out);
    dc_fmt(err, DC_ERR_MAX, "deploy: the target's and the strategy's webhooks together are more than %d: keep "
           "fewer", WEBHOOK_MAX);
    return -1;
  }
  return 0;
}

/* ---- from JSON (a manifest) ---- */

static const char *const json_fields[] = {"name", "type", "url", "secret", "timeout", "retries", "interval", NULL};

static int json_string_field(const json_t *o, const char *key, const char **out, char *field, size_t fsize,
                             char *err) {
  json_t *v = json_object_get(o, key);
  *out = NULL;
  if (!v)
    return 0;
  if (!json_is_string(v))
    return fail(field, fsize, key, err, "must be a string");
  *out = json_string_value(v);
  return 0;
}

static int json_number_field(const json_t *o, const char *key, double *out, char *field, size_t fsize, char *err) {
  json_t *v = json_object_get(o, key);
  *out = NAN;
  if (!v)
    return 0;
  if (!json_is_number(v))
    return fail(field, fsize, key, err, "must be a number");
  *out = json_number_value(v);
  return 0;
}

static int json_entry(webhook_list *l, const json_t *o, webhook_origin origin, char *field, size_t fsize,
                      char *err) {
  char msg[DC_ERR_MAX];
  if (!json_is_object(o))
    return fail(field, fsize, "", err, "must be an object such as {\"name\": \"qa-gate\", \"type\": "
                                       "\"confirm-promotion\", \"url\": \"https://...\"}");
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)o, key, v) {
    int known = 0;
    for (const char *const *k = json_fields; *k; k++)
      known |= strcmp(*k, key) == 0;
    if (!known) {
      char *shown = dc_printable(key);
      dc_fmt(msg, sizeof msg, "has an unknown field '%.64s' (known: name, type, url, secret, timeout, retries, "
             "interval): remove it", shown ? shown : "?");
      free(shown);
      return fail(field, fsize, "", err, msg);
    }
  }
  webhook_spec s;
  if (json_string_field(o, "name", &s.name, field, fsize, err) || json_string_field(o, "type", &s.type, field, fsize, err) ||
      json_string_field(o, "url", &s.url, field, fsize, err) ||
      json_string_field(o, "secret", &s.secret, field, fsize, err) ||
      json_number_field(o, "timeout", &s.timeout, field, fsize, err) ||
      json_number_field(o, "retries", &s.retries, field, fsize, err) ||
      json_number_field(o, "interval", &s.interval, field, fsize, err))
    return -1;
  return webhook_add(l, &s, origin, field, fsize, err);
}

int webhook_list_from_json(webhook_list *out, const json_t *arr, webhook_origin origin, char *field, size_t fsize,
                           char *err) {
  out->v = NULL;
  out->n = 0;
  if (!json_is_array(arr))
    return fail(field, fsize, "webhooks", err, "must be a list of webhooks such as [{\"name\": \"qa-gate\", "
                                               "\"type\": \"confirm-promotion\", \"url\": \"https://...\"}]");
  for (size_t i = 0; i < json_array_size(arr); i++) {
    char inner[64];
    if (json_entry(out, json_array_get(arr, i), origin, inner, sizeof inner, err) != 0) {
      dc_fmt(field, fsize, "webhooks[%zu]%s%s", i + 1, inner[0] ? "." : "", inner);
      webhook_list_clear(out);
      return -1;
    }
  }
  return 0;
}

/* ---- one delivery ---- */

struct webhook_call {
  engine *e;
  webhook w;
  char *body;
  size_t body_len;
  char signature[8 + DC_SHA256_HEX];
  char delivery[48];
  char label[64];
  int attempts_after, attempt;
  httpreq *req;
  engine_timer *timer;
  webhook_done_cb cb;
  void *payload;
  webhook_answer answer;
};

static void call_free(webhook_call *c) {
  free(c->body);
  explicit_bzero(c, sizeof *c);
  free(c);
}

static void call_send(webhook_call *c);

static void call_retry(void *payload) {
  webhook_call *c = payload;
  c->timer = NULL;
  call_send(c);
}

static void call_end(webhook_call *c) {
  webhook_done_cb cb = c->cb;
  void *payload = c->payload;
  webhook_answer a = c->answer;
  call_free(c);
  cb(payload, &a);
}

/* "status 503: <the start of the body>", printable. */
static void describe_answer(webhook_answer *a, const httpreq_response *res) {
  if (res->error != HTTPREQ_OK) {
    dc_fmt(a->detail, sizeof a->detail, "%s", res->message ? res->message : "failed");
    return;
  }
  char excerpt[201];
  size_t n = res->body_len < sizeof excerpt - 1 ? res->body_len : sizeof excerpt - 1;
  memcpy(excerpt, res->body, n);
  excerpt[n] = '\0';
  char *shown = dc_printable(excerpt);
  if (shown && *shown)
    dc_fmt(a->detail, sizeof a->detail, "status %ld: %s%s", res->status, shown, res->body_len > n ? "..." : "");
  else
    dc_fmt(a->detail, sizeof a->detail, "status %ld", res->status);
  free(shown);
  dc_redact(a->detail);
}

static void call_answered(void *payload, const httpreq_response *res) {
  webhook_call *c = payload;
  c->req = NULL;
  c->answer.attempts = c->attempt;
  c->answer.status = res->status;
  c->answer.error = res->error;
  c->answer.ok = res->error == HTTPREQ_OK && res->status >= 200 && res->status < 300;
  describe_answer(&c->answer, res);
  if (c->answer.ok || c->attempt > c->attempts_after) {
    call_end(c);
    return;
  }
  double wait = c->attempt < 5 ? c->attempt : 5; /* 1 s, 2 s, ... at most 5 s between attempts */
  c->timer = engine_timer_start(c->e, wait, call_retry, c);
}

static void call_send(webhook_call *c) {
  char err[DC_ERR_MAX], attempt[16];
  dc_fmt(attempt, sizeof attempt, "%d", ++c->attempt);
  httpreq_header h[6] = {{"Content-Type", "application/json"},
                         {"X-Deploy-Delivery", c->delivery},
                         {"X-Deploy-Attempt", attempt}};
  size_t nh = 3;
  if (c->label[0])
    h[nh++] = (httpreq_header){"X-Deploy-Webhook", c->label};
  if (c->signature[0])
    h[nh++] = (httpreq_header){"X-Deploy-Signature", c->signature};
  httpreq_opts o = {.method = "POST", .url = c->w.url, .headers = h, .nheaders = nh, .body = c->body,
                    .body_len = c->body_len, .timeout = c->w.timeout, .max_body = 64 * 1024,
                    .user_agent = "deployctl-webhook/1"};
  int rc = httpreq_start(&c->req, c->e, &o, call_answered, c, err);
  if (rc == 0)
    return;
  /* Refused before anything was sent (a URL the module cannot parse): no
   * later attempt would fare better. */
  httpreq_response res = {.error = (httpreq_error)rc, .message = dc_unprefix(err)};
  c->attempt = c->attempts_after + 1;
  call_answered(c, &res);
}

static void call_first(void *payload) {
  webhook_call *c = payload;
  c->timer = NULL;
  call_send(c);
}

webhook_call *webhook_call_start(engine *e, const webhook *w, const char *label, const json_t *body,
                                 int attempts_after, webhook_done_cb cb, void *cb_payload) {
  webhook_call *c = calloc(1, sizeof *c);
  if (!c)
    return NULL;
  c->body = dc_json_dump(body);
  if (!c->body) {
    free(c);
    return NULL;
  }
  c->e = e;
  c->w = *w;
  c->body_len = strlen(c->body);
  c->attempts_after = attempts_after;
  dc_strlcpy(c->label, label ? label : "", sizeof c->label);
  c->cb = cb;
  c->payload = cb_payload;
  dc_new_id(c->delivery, sizeof c->delivery);
  if (w->secret[0]) {
    char hex[DC_SHA256_HEX];
    if (dc_hmac_sha256_hex(w->secret, strlen(w->secret), c->body, c->body_len, hex) != 0) {
      call_free(c);
      return NULL;
    }
    dc_fmt(c->signature, sizeof c->signature, "sha256=%s", hex);
  }
  /* From the loop, as every answer: the caller never hears back inside
   * its own call. */
  c->timer = engine_timer_start(e, 0, call_first, c);
  return c;
}

void webhook_call_cancel(webhook_call *c) {
  if (!c)
    return;
  engine_timer_cancel(c->timer);
  httpreq_cancel(c->req);
  call_free(c);
}
