/* Health checks with libcurl (part of the HTTP module, deploy-http.so, see
 * module.h): one GET per URL, all in flight at once on the engine's
 * libcurl multi, and one callback when the last one has finished. */
#include "health.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "util.h"

/* A health endpoint answers with a status and a few bytes. A larger body is
 * cut off here (the status is already known) so a misbehaving endpoint cannot
 * stream for the whole timeout. */
#define HEALTH_BODY_CAP (64 * 1024)
#define HEALTH_DEFAULT_TIMEOUT 2.0
#define HEALTH_DEFAULT_STATUS 200L
/* Bounds that keep the conversion to curl's milliseconds in range: 0 ms
 * would mean "no timeout" to curl. */
#define HEALTH_MIN_TIMEOUT 0.001
#define HEALTH_MAX_TIMEOUT 86400.0

typedef struct check check;

typedef struct probe {
  check *c;
  size_t idx;
  CURL *easy;
  size_t body;   /* bytes received and discarded */
  int capped;    /* the body reached HEALTH_BODY_CAP and we cut the transfer */
  char errbuf[CURL_ERROR_SIZE];
} probe;

struct check {
  size_t n;
  size_t pending;        /* transfers started and not yet finished */
  int cancelled;         /* start failed midway: finish without calling cb */
  double timeout;
  long expect;
  health_cb cb;
  void *payload;
  char **urls;           /* our copies; results[i].url points at urls[i] */
  health_result *results;
  probe *probes;
  uv_timer_t timer;      /* n == 0 only: calls cb from the loop */
};


/* ---- lifetime ----------------------------------------------------------- */

static void check_free(check *c) {
  for (size_t i = 0; i < c->n; i++) {
    curl_easy_cleanup(c->probes[i].easy);
    free(c->urls[i]);
  }
  free(c->urls);
  free(c->results);
  free(c->probes);
  free(c);
}

static double clamp_timeout(double t) {
  if (!(t > 0)) /* also NaN */
    return HEALTH_DEFAULT_TIMEOUT;
  if (t < HEALTH_MIN_TIMEOUT)
    return HEALTH_MIN_TIMEOUT;
  return t > HEALTH_MAX_TIMEOUT ? HEALTH_MAX_TIMEOUT : t;
}

static check *check_new(size_t n, const health_opts *opts, health_cb cb,
                        void *payload) {
  check *c = calloc(1, sizeof *c);
  if (!c)
    return NULL;
  c->urls = calloc(n ? n : 1, sizeof *c->urls);
  c->results = calloc(n ? n : 1, sizeof *c->results);
  c->probes = calloc(n ? n : 1, sizeof *c->probes);
  if (!c->urls || !c->results || !c->probes) {
    check_free(c);
    return NULL;
  }
  c->n = n;
  c->cb = cb;
  c->payload = payload;
  c->timeout = clamp_timeout(opts ? opts->timeout : 0);
  c->expect = opts && opts->expect_status > 0 ? opts->expect_status
                                              : HEALTH_DEFAULT_STATUS;
  return c;
}

/* ---- results ------------------------------------------------------------ */

/* "2.0" for whole tenths, as people write timeouts; full precision otherwise
 * so 0.25 s does not read as 0.2 s. */
static void format_seconds(char *dst, size_t size, double s) {
  double tenths = s * 10.0;
  double off = tenths - (double)(long)(tenths + 0.5);
  if (off < 1e-9 && off > -1e-9)
    dc_fmt(dst, size, "%.1f", s);
  else
    dc_fmt(dst, size, "%g", s);
}

static void describe_failure(const probe *p, CURLcode rc, char *dst,
                             size_t size) {
  char secs[32];
  long os_errno = 0;
  switch (rc) {
  case CURLE_OPERATION_TIMEDOUT:
    format_seconds(secs, sizeof secs, p->c->timeout);
    dc_fmt(dst, size, "timeout after %s s", secs);
    return;
  case CURLE_COULDNT_CONNECT:
    curl_easy_getinfo(p->easy, CURLINFO_OS_ERRNO, &os_errno);
    if (os_errno == ECONNREFUSED) {
      dc_strlcpy(dst, "connection refused", size);
      return;
    }
    break;
  case CURLE_ABORTED_BY_CALLBACK:
    dc_strlcpy(dst, "aborted: the HTTP client shut down before the check "
                    "finished", size);
    return;
  default:
    break;
  }
  if (p->errbuf[0])
    dc_fmt(dst, size, "%s (%s)", curl_easy_strerror(rc), p->errbuf);
  else
    dc_strlcpy(dst, curl_easy_strerror(rc), size);
}

static void probe_record(probe *p, CURLcode rc) {
  check *c = p->c;
  health_result *r = &c->results[p->idx];
  double total = 0;
  curl_easy_getinfo(p->easy, CURLINFO_RESPONSE_CODE, &r->status);
  curl_easy_getinfo(p->easy, CURLINFO_TOTAL_TIME, &total);
  r->latency = total;
  if (rc == CURLE_WRITE_ERROR && p->capped)
    rc = CURLE_OK; /* our own cut: the status line already arrived */
  if (rc != CURLE_OK)
    describe_failure(p, rc, r->error, sizeof r->error);
  else if (r->status != c->expect)
    dc_fmt(r->error, sizeof r->error, "status %ld (expected %ld)", r->status,
           c->expect);
  else
    r->ok = 1;
}

static void on_probe_done(CURL *easy, CURLcode rc, void *payload) {
  (void)easy;
  probe *p = payload;
  check *c = p->c;
  if (!c->cancelled)
    probe_record(p, rc);
  if (--c->pending > 0)
    return;
  if (!c->cancelled)
    c->cb(c->payload, c->results, c->n);
  check_free(c);
}

/* ---- start -------------------------------------------------------------- */

static size_t discard_body(char *data, size_t size, size_t nmemb, void *userp) {
  (void)data;
  probe *p = userp;
  size_t len = size * nmemb;
  if (len > HEALTH_BODY_CAP - p->body) {
    p->capped = 1;
    return 0; /* makes curl stop the transfer with CURLE_WRITE_ERROR */
  }
  p->body += len;
  return len;
}

/* curl_easy_setopt(CURLOPT_URL) accepts anything; parse now so a typo is an
 * error from health_check_start, not an unhealthy result later. */
static int url_validate(const char *url, char *why, size_t size) {
  CURLU *u = curl_url();
  if (!u) {
    dc_strlcpy(why, "out of memory", size);
    return -1;
  }
  char *scheme = NULL;
  CURLUcode uc = curl_url_set(u, CURLUPART_URL, url, 0);
  if (uc == CURLUE_OK)
    uc = curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
  int rc = -1;
  if (uc != CURLUE_OK)
    dc_strlcpy(why, curl_url_strerror(uc), size);
  else if (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0)
    dc_fmt(why, size, "scheme '%s' is not http or https", scheme);
  else
    rc = 0;
  curl_free(scheme);
  curl_url_cleanup(u);
  return rc;
}

/* Fresh connection per check, closed afterwards: a check must see whether
 * the instance accepts connections now, not reuse one opened earlier. */
static void probe_configure(probe *p, const char *url, long timeout_ms) {
  CURL *e = p->easy;
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms);
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard_body);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, p);
  curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(e, CURLOPT_USERAGENT, "deployctl-health/1");
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, p->errbuf);
  curl_easy_setopt(e, CURLOPT_FRESH_CONNECT, 1L);
  curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L);
}

static int probe_prepare(check *c, size_t i, const char *url, char *err) {
  char why[256], shown[256];
  if (!url) {
    dc_errf(err, "health: URL #%zu is missing (NULL)", i + 1);
    return -1;
  }
  dc_redact_url(shown, sizeof shown, url);
  if (url_validate(url, why, sizeof why) != 0) {
    dc_errf(err, "health: bad URL '%s': %s (expected http://host:port/path)",
            shown, why);
    return -1;
  }
  probe *p = &c->probes[i];
  p->c = c;
  p->idx = i;
  c->urls[i] = strdup(url);
  p->easy = curl_easy_init();
  if (!c->urls[i] || !p->easy) {
    dc_errf(err, "health: out of memory preparing the check of '%s'", shown);
    return -1;
  }
  c->results[i].url = c->urls[i];
  probe_configure(p, url, (long)(c->timeout * 1000.0 + 0.5));
  return 0;
}

/* http never finishes a transfer inside http_add, so pending can be counted
 * as we go. If an add fails, the ones already running finish silently. */
static int start_all(check *c, http *h, char *err) {
  for (size_t i = 0; i < c->n; i++) {
    if (http_add(h, c->probes[i].easy, on_probe_done, &c->probes[i]) == 0) {
      c->pending++;
      continue;
    }
    char shown[256];
    dc_redact_url(shown, sizeof shown, c->urls[i]);
    dc_errf(err, "health: could not start the check of '%s' (out of memory, "
                 "or the engine is shutting down)", shown);
    if (c->pending == 0)
      check_free(c);
    else
      c->cancelled = 1;
    return -1;
  }
  return 0;
}

static void on_empty_closed(uv_handle_t *handle) { check_free(handle->data); }

static void on_empty_timer(uv_timer_t *timer) {
  check *c = timer->data;
  c->cb(c->payload, NULL, 0);
  uv_close((uv_handle_t *)timer, on_empty_closed);
}

/* Even an empty check answers from the loop, so callers see one ordering. */
static int start_empty(engine *e, check *c, char *err) {
  uv_timer_init(e->loop, &c->timer); /* cannot fail */
  c->timer.data = c;
  if (uv_timer_start(&c->timer, on_empty_timer, 0, 0) != 0) {
    dc_errf(err, "health: could not schedule an empty check");
    uv_close((uv_handle_t *)&c->timer, on_empty_closed);
    return -1;
  }
  return 0;
}

int healthcheck_start(engine *e, const char *const *urls, size_t n,
                    const health_opts *opts, health_cb cb, void *payload,
                    char *err) {
  if (!e || !e->loop || !cb || (n > 0 && !urls)) {
    dc_errf(err, "health: health_check_start needs an engine with a loop, "
                 "a callback and the urls");
    return -1;
  }
  check *c = check_new(n, opts, cb, payload);
  if (!c) {
    dc_errf(err, "health: out of memory starting a check of %zu URLs", n);
    return -1;
  }
  if (n == 0)
    return start_empty(e, c, err);
  for (size_t i = 0; i < n; i++) {
    if (probe_prepare(c, i, urls[i], err) != 0) {
      check_free(c);
      return -1;
    }
  }
  http *h = http_engine_client(e);
  if (!h) {
    dc_errf(err, "health: the engine has no HTTP client (libcurl multi "
                 "could not be created)");
    check_free(c);
    return -1;
  }
  return start_all(c, h, err);
}
