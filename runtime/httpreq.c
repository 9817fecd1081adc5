/* One HTTP request with libcurl (part of the HTTP module, deploy-http.so:
 * see module.h and httpreq.h). The request is an easy handle on the
 * engine's multi (http.c); the answer's headers and body are collected
 * here, each under a cap, and handed to the caller once. Also the
 * module's one exported table. */
#include "httpreq.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "http_module.h"
#include "util.h"

#define USER_AGENT "deployctl/1"

typedef struct req {
  http *h;
  CURL *easy;
  struct curl_slist *headers;
  httpreq_cb cb;
  void *payload;
  double timeout;
  size_t max_body;
  dc_buf body;
  dc_buf head;             /* the answer's header lines (of its last block) */
  int body_capped;         /* we cut the transfer: the body passed max_body */
  int head_capped;         /* the same for the headers */
  int cancelled;           /* cancelled while http could not take it back */
  char errbuf[CURL_ERROR_SIZE];
} req;

__attribute__((format(printf, 2, 3)))
static void set_err(char *err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  dc_vfmt(err, DC_ERR_MAX, fmt, ap);
  va_end(ap);
}

static void req_free(req *r) {
  if (!r)
    return;
  curl_easy_cleanup(r->easy);
  curl_slist_free_all(r->headers);
  dc_buf_free(&r->body);
  dc_buf_free(&r->head);
  free(r);
}

/* ---- the answer ---- */

static size_t on_body(char *data, size_t size, size_t nmemb, void *userp) {
  req *r = userp;
  size_t len = size * nmemb;
  if (len > r->max_body - r->body.len) {
    r->body_capped = 1;
    return 0; /* curl stops the transfer with CURLE_WRITE_ERROR */
  }
  dc_buf_add(&r->body, data, len);
  return r->body.oom ? 0 : len;
}

/* A new status line starts a new block (a 100 Continue before the real
 * answer): only the last block's headers are the answer's. */
static size_t on_header(char *data, size_t size, size_t nmemb, void *userp) {
  req *r = userp;
  size_t len = size * nmemb;
  if (len >= 5 && memcmp(data, "HTTP/", 5) == 0)
    r->head.len = 0;
  if (len > HTTPREQ_MAX_HEADER_BYTES - r->head.len) {
    r->head_capped = 1;
    return 0;
  }
  dc_buf_add(&r->head, data, len);
  return r->head.oom ? 0 : len;
}

/* Splits the header lines into name/value pairs (names lower-cased, values
 * trimmed), in place. *out is heap (n entries), pointing into r->head. */
static size_t parse_headers(req *r, httpreq_header **out) {
  size_t lines = 0;
  *out = NULL;
  for (size_t i = 0; i < r->head.len; i++)
    lines += r->head.data[i] == '\n';
  if (!lines)
    return 0;
  httpreq_header *v = calloc(lines, sizeof *v);
  if (!v)
    return 0;
  size_t n = 0;
  char *p = r->head.data, *end = r->head.data + r->head.len;
  while (p < end) {
    char *nl = memchr(p, '\n', (size_t)(end - p));
    char *line_end = nl ? nl : end;
    char *next = nl ? nl + 1 : end;
    while (line_end > p && (line_end[-1] == '\r' || line_end[-1] == '\n'))
      line_end--;
    *line_end = '\0';
    char *colon = strchr(p, ':');
    if (colon && colon != p && strncmp(p, "HTTP/", 5) != 0) {
      *colon = '\0';
      for (char *c = p; *c; c++)
        *c = (char)tolower((unsigned char)*c);
      char *value = colon + 1;
      while (*value == ' ' || *value == '\t')
        value++;
      char *ve = value + strlen(value);
      while (ve > value && (ve[-1] == ' ' || ve[-1] == '\t'))
        *--ve = '\0';
      v[n].name = p;
      v[n].value = value;
      n++;
    }
    p = next;
  }
  *out = v;
  return n;
}

/* "5" for whole seconds, as people write timeouts; "0.25" otherwise. */
static void describe(req *r, CURLcode rc, httpreq_response *res, char *msg, size_t size) {
  long os_errno = 0;
  switch (rc) {
  case CURLE_OK:
    res->error = HTTPREQ_OK;
    return;
  case CURLE_OPERATION_TIMEDOUT:
    res->error = HTTPREQ_TIMEOUT;
    dc_fmt(msg, size, "timeout after %g s", r->timeout);
    return;
  case CURLE_COULDNT_CONNECT:
    curl_easy_getinfo(r->easy, CURLINFO_OS_ERRNO, &os_errno);
    if (os_errno == ECONNREFUSED) {
      res->error = HTTPREQ_REFUSED;
      dc_strlcpy(msg, "connection refused", size);
      return;
    }
    break;
  case CURLE_WRITE_ERROR:
    if (r->body_capped) {
      res->error = HTTPREQ_TOO_LARGE;
      dc_fmt(msg, size, "the answer's body is larger than %zu bytes (max_body): refused", r->max_body);
      return;
    }
    if (r->head_capped) {
      res->error = HTTPREQ_TOO_LARGE;
      dc_fmt(msg, size, "the answer's headers are larger than %d bytes: refused", HTTPREQ_MAX_HEADER_BYTES);
      return;
    }
    if (r->body.oom || r->head.oom) {
      res->error = HTTPREQ_FAILED;
      dc_strlcpy(msg, "out of memory reading the answer", size);
      return;
    }
    break;
  case CURLE_ABORTED_BY_CALLBACK:
    res->error = HTTPREQ_FAILED;
    dc_strlcpy(msg, "aborted: the HTTP client shut down before the answer came", size);
    return;
  default:
    break;
  }
  res->error = HTTPREQ_FAILED;
  if (r->errbuf[0])
    dc_fmt(msg, size, "%s (%s)", curl_easy_strerror(rc), r->errbuf);
  else
    dc_strlcpy(msg, curl_easy_strerror(rc), size);
}

static void on_done(CURL *easy, CURLcode rc, void *payload) {
  (void)easy;
  req *r = payload;
  if (r->cancelled) {
    req_free(r);
    return;
  }
  httpreq_response res;
  char msg[DC_ERR_MAX] = "";
  memset(&res, 0, sizeof res);
  describe(r, rc, &res, msg, sizeof msg);
  res.message = res.error == HTTPREQ_OK ? NULL : msg;
  curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &res.status);
  curl_easy_getinfo(r->easy, CURLINFO_TOTAL_TIME, &res.duration);
  httpreq_header *headers = NULL;
  if (res.error == HTTPREQ_OK) {
    res.nheaders = parse_headers(r, &headers);
    res.headers = headers;
    res.body = r->body.data ? r->body.data : "";
    res.body_len = r->body.len;
  } else {
    res.body = "";
  }
  r->cb(r->payload, &res);
  free(headers);
  req_free(r);
}

/* ---- checking what is asked ---- */

static int url_check(const char *url, char *err) {
  CURLU *u = curl_url();
  char *scheme = NULL, *host = NULL, shown[512];
  if (!u) {
    set_err(err, "http: out of memory");
    return HTTPREQ_FAILED;
  }
  dc_redact_url(shown, sizeof shown, url);
  CURLUcode uc = curl_url_set(u, CURLUPART_URL, url, 0);
  if (uc == CURLUE_OK)
    uc = curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
  if (uc == CURLUE_OK)
    uc = curl_url_get(u, CURLUPART_HOST, &host, 0);
  int rc = HTTPREQ_BAD_URL;
  if (uc != CURLUE_OK)
    set_err(err, "http: bad URL '%s': %s (expected http://host[:port]/path or https://...)", shown,
            curl_url_strerror(uc));
  else if (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0)
    set_err(err, "http: bad URL '%s': scheme '%s' is not http or https", shown, scheme);
  else
    rc = 0;
  curl_free(scheme);
  curl_free(host);
  curl_url_cleanup(u);
  return rc;
}

static int is_token_char(unsigned char c) {
  return isalnum(c) || strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static int header_check(const httpreq_header *h, char *err) {
  if (!h->name || !*h->name || !h->value) {
    set_err(err, "http: a header needs a name and a value");
    return -1;
  }
  for (const unsigned char *c = (const unsigned char *)h->name; *c; c++) {
    if (!is_token_char(*c)) {
      set_err(err, "http: header name '%.64s' holds a character a header name cannot have (%s)",
              h->name, *c < 32 ? "a control character" : "e.g. a space or ':'");
      return -1;
    }
  }
  if (strpbrk(h->value, "\r\n")) {
    set_err(err, "http: the value of header '%.64s' holds a line break: refused (it would start another header)",
            h->name);
    return -1;
  }
  return 0;
}

static int method_check(const char *m, char *err) {
  size_t n = strlen(m);
  int ok = n >= 1 && n <= 16;
  for (size_t i = 0; ok && i < n; i++)
    ok = m[i] >= 'A' && m[i] <= 'Z';
  if (!ok)
    set_err(err, "http: method '%.32s' is not an HTTP method: use upper-case letters such as GET, POST, PUT", m);
  return ok ? 0 : -1;
}

/* ---- starting ---- */

static int configure(req *r, const httpreq_opts *o, char *err) {
  CURL *e = r->easy;
  const char *method = o->method && *o->method ? o->method : "GET";
  for (size_t i = 0; i < o->nheaders; i++) {
    char line[8192];
    if (header_check(&o->headers[i], err) != 0)
      return HTTPREQ_BAD_REQUEST;
    if (strlen(o->headers[i].name) + strlen(o->headers[i].value) + 3 > sizeof line) {
      set_err(err, "http: header '%.64s' is longer than %zu bytes", o->headers[i].name, sizeof line - 3);
      return HTTPREQ_BAD_REQUEST;
    }
    /* "Name;" is curl's way to send a header with an empty value. */
    if (o->headers[i].value[0])
      dc_fmt(line, sizeof line, "%s: %s", o->headers[i].name, o->headers[i].value);
    else
      dc_fmt(line, sizeof line, "%s;", o->headers[i].name);
    struct curl_slist *l = curl_slist_append(r->headers, line);
    if (!l) {
      set_err(err, "http: out of memory");
      return HTTPREQ_FAILED;
    }
    r->headers = l;
  }
  /* No "Expect: 100-continue" round trip before a larger body. */
  struct curl_slist *l = curl_slist_append(r->headers, "Expect:");
  if (!l) {
    set_err(err, "http: out of memory");
    return HTTPREQ_FAILED;
  }
  r->headers = l;
  long ms = (long)(r->timeout * 1000.0 + 0.5);
  curl_easy_setopt(e, CURLOPT_URL, o->url);
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, ms);
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, ms);
  curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(e, CURLOPT_USERAGENT, o->user_agent ? o->user_agent : USER_AGENT);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
  curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
  if (o->body) {
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)o->body_len);
    curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, o->body);
  }
  if (strcmp(method, "HEAD") == 0)
    curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
  else if (strcmp(method, "POST") != 0 || !o->body)
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
  return 0;
}

static double clamp_timeout(double t) {
  if (!(t > 0)) /* also NaN */
    return HTTPREQ_DEFAULT_TIMEOUT;
  if (t < 0.001)
    return 0.001;
  return t > HTTPREQ_MAX_TIMEOUT ? HTTPREQ_MAX_TIMEOUT : t;
}

static int request_start(void **out, engine *e, const httpreq_opts *o, httpreq_cb cb, void *payload, char *err) {
  *out = NULL;
  if (!e || !o || !o->url || !cb) {
    set_err(err, "http: a request needs an engine, a URL and a callback");
    return HTTPREQ_FAILED;
  }
  int rc = url_check(o->url, err);
  if (rc == 0 && method_check(o->method && *o->method ? o->method : "GET", err) != 0)
    rc = HTTPREQ_BAD_REQUEST;
  if (rc != 0)
    return rc;
  req *r = calloc(1, sizeof *r);
  if (!r || !(r->easy = curl_easy_init())) {
    free(r);
    set_err(err, "http: out of memory");
    return HTTPREQ_FAILED;
  }
  r->cb = cb;
  r->payload = payload;
  r->timeout = clamp_timeout(o->timeout);
  r->max_body = o->max_body ? o->max_body : HTTPREQ_DEFAULT_MAX_BODY;
  if ((rc = configure(r, o, err)) != 0) {
    req_free(r);
    return rc;
  }
  r->h = http_engine_client(e);
  if (!r->h || http_add(r->h, r->easy, on_done, r) != 0) {
    req_free(r);
    set_err(err, "http: could not start the request (out of memory, or the engine is shutting down)");
    return HTTPREQ_FAILED;
  }
  *out = r;
  return 0;
}

static void request_cancel(void *handle) {
  req *r = handle;
  if (!r)
    return;
  if (http_remove(r->h, r->easy) == 0)
    req_free(r);
  else
    r->cancelled = 1; /* its callback comes (the client shuts down) and frees it */
}

/* ---- the module's one entry point ---- */

__attribute__((visibility("default"))) const http_module_api deploy_http_api = {
    .version = HTTP_MODULE_API_VERSION,
    .check_start = healthcheck_start,
    .request_start = request_start,
    .request_cancel = request_cancel,
};
