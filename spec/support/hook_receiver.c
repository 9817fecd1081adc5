/* hook-receiver: the HTTP server the webhook and deploy.http specs talk to.
 * A small HTTP/1.1 server on libuv, one request per connection (every
 * answer says Connection: close), that logs each request and answers as
 * its path asks, so a spec can make it say anything a real receiver might.
 *
 *   hook-receiver --port P --dir D [--secret S] [--host 127.0.0.1]
 *
 * Each request is appended to D/requests.jsonl as one JSON object:
 *   {"n":1,"method":"POST","path":"/gate/qa","signature":"ok","headers":{...},"body":"..."}
 * signature: "ok" or "bad" (checked against --secret: HMAC-SHA256 of the
 * body with OpenSSL's HMAC(), compared with X-Deploy-Signature's
 * sha256=<hex>), "missing" (--secret given, no header), "unchecked" (no
 * --secret). A request whose signature is bad or missing is answered 401,
 * whatever its path.
 *
 * Paths:
 *   /ok                  200 {"ok":true}
 *   /status/NNN          NNN
 *   /gate/NAME           200 once the file D/open-NAME exists, else 403
 *   /wait/NAME           holds the answer until D/open-NAME exists, then 200
 *   /rollback/NAME       200 once D/rollback-NAME exists, else 404
 *   /flaky/N/NAME        500 for the first N requests to it, then 200
 *   /slow/MS             200 after MS milliseconds
 *   /hang                never answers (the client gives up)
 *   /huge/BYTES          200 with a body of BYTES bytes
 *   /redirect            302 to /ok
 *   /text                200 with a body that is not JSON
 *   /notify/NAME         200 (a notification destination: only logged)
 *   anything else        404
 * SIGTERM or SIGINT ends it. */
#include <uv.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <ctype.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define HEAD_CAP (64 * 1024)
#define BODY_CAP (4 * 1024 * 1024)

typedef struct conn {
  uv_tcp_t tcp;
  char waiting_for[256];   /* /wait/NAME: the file that releases the answer */
  uv_timer_t timer;
  uv_write_t wreq;
  int handles;
  int answered;
  char *in;
  size_t len, cap;
  size_t head_len;         /* bytes of the head, "\r\n\r\n" included; 0 until complete */
  size_t body_len;         /* Content-Length */
  char *out;
  size_t out_len;
} conn;

typedef struct flaky {
  char path[256];
  int seen;
  struct flaky *next;
} flaky;

static struct {
  const char *host, *dir, *secret;
  int port;
  uv_loop_t *loop;
  uv_tcp_t listener;
  uv_signal_t sigterm, sigint;
  long n;
  flaky *flakies;
} rx;

static void on_closed(uv_handle_t *h) {
  conn *c = h->data;
  if (--c->handles == 0) {
    free(c->in);
    free(c->out);
    free(c);
  }
}

static void conn_close(conn *c) {
  if (uv_is_closing((uv_handle_t *)&c->tcp))
    return;
  uv_close((uv_handle_t *)&c->tcp, on_closed);
  uv_close((uv_handle_t *)&c->timer, on_closed);
}

/* ---- the log ---- */

static void json_string(FILE *f, const char *s, size_t n) {
  fputc('"', f);
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '"' || ch == '\\')
      fprintf(f, "\\%c", ch);
    else if (ch < 0x20 || ch == 0x7f || ch >= 0x80)
      fprintf(f, "\\u%04x", ch); /* bytes, not characters: the specs compare what was sent */
    else
      fputc(ch, f);
  }
  fputc('"', f);
}

/* The value of header `name` in the head (NULL when absent); *len its length. */
static const char *header(const conn *c, const char *name, size_t *len) {
  size_t nl = strlen(name);
  const char *p = memchr(c->in, '\n', c->head_len);
  const char *end = c->in + c->head_len;
  while (p && p + 1 < end) {
    p++;
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol)
      break;
    if ((size_t)(eol - p) > nl && p[nl] == ':' && strncasecmp(p, name, nl) == 0) {
      const char *v = p + nl + 1;
      while (*v == ' ' || *v == '\t')
        v++;
      const char *ve = eol;
      while (ve > v && (ve[-1] == '\r' || ve[-1] == ' '))
        ve--;
      *len = (size_t)(ve - v);
      return v;
    }
    p = eol;
  }
  return NULL;
}

static void log_request(const conn *c, const char *method, const char *path, const char *signature) {
  char file[4096];
  snprintf(file, sizeof file, "%s/requests.jsonl", rx.dir);
  FILE *f = fopen(file, "a");
  if (!f)
    return;
  fprintf(f, "{\"n\":%ld,\"method\":", ++rx.n);
  json_string(f, method, strlen(method));
  fputs(",\"path\":", f);
  json_string(f, path, strlen(path));
  fprintf(f, ",\"signature\":\"%s\",\"headers\":{", signature);
  /* every header line after the request line, names lower-cased */
  const char *p = memchr(c->in, '\n', c->head_len), *end = c->in + c->head_len;
  int first = 1;
  while (p && p + 1 < end) {
    p++;
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    const char *colon = eol ? memchr(p, ':', (size_t)(eol - p)) : NULL;
    if (!colon)
      break;
    char name[128];
    size_t nl = (size_t)(colon - p) < sizeof name - 1 ? (size_t)(colon - p) : sizeof name - 1;
    for (size_t i = 0; i < nl; i++)
      name[i] = (char)tolower((unsigned char)p[i]);
    name[nl] = '\0';
    const char *v = colon + 1;
    while (*v == ' ')
      v++;
    const char *ve = eol;
    while (ve > v && (ve[-1] == '\r' || ve[-1] == ' '))
      ve--;
    fputs(first ? "" : ",", f);
    first = 0;
    json_string(f, name, strlen(name));
    fputc(':', f);
    json_string(f, v, (size_t)(ve - v));
    p = eol;
  }
  fputs("},\"body\":", f);
  json_string(f, c->in + c->head_len, c->body_len);
  fputs("}\n", f);
  fclose(f);
}

/* ---- the signature ---- */

static const char *check_signature(const conn *c) {
  if (!rx.secret)
    return "unchecked";
  size_t len = 0;
  const char *sig = header(c, "X-Deploy-Signature", &len);
  if (!sig)
    return "missing";
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (!HMAC(EVP_sha256(), rx.secret, (int)strlen(rx.secret), (const unsigned char *)c->in + c->head_len,
            c->body_len, mac, &n))
    return "bad";
  char want[7 + 2 * EVP_MAX_MD_SIZE + 1] = "sha256=";
  for (unsigned int i = 0; i < n; i++)
    snprintf(want + 7 + 2 * i, 3, "%02x", mac[i]);
  return len == strlen(want) && memcmp(sig, want, len) == 0 ? "ok" : "bad";
}

/* ---- answers ---- */

static void on_written(uv_write_t *req, int status) {
  (void)status;
  conn_close(req->data);
}

static void respond(conn *c, int status, const char *extra, const char *body, size_t blen) {
  const char *reason = status == 200 ? "OK" : status == 302 ? "Found" : status < 400 ? "Other" : "Error";
  char head[512];
  int hl = snprintf(head, sizeof head,
                    "HTTP/1.1 %d %s\r\nContent-Length: %zu\r\nConnection: close\r\n%s\r\n", status, reason, blen,
                    extra ? extra : "");
  c->out = malloc((size_t)hl + blen);
  if (!c->out) {
    conn_close(c);
    return;
  }
  memcpy(c->out, head, (size_t)hl);
  if (body)
    memcpy(c->out + hl, body, blen);
  else
    memset(c->out + hl, 'x', blen);
  c->out_len = (size_t)hl + blen;
  uv_buf_t b = uv_buf_init(c->out, (unsigned)c->out_len);
  c->wreq.data = c;
  c->answered = 1;
  if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0)
    conn_close(c);
}

static void respond_text(conn *c, int status, const char *body) {
  respond(c, status, "Content-Type: application/json\r\n", body, strlen(body));
}

static int file_exists(const char *prefix, const char *name) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s%s", rx.dir, prefix, name);
  return access(path, F_OK) == 0;
}

static void on_slow(uv_timer_t *t) { respond_text(t->data, 200, "{\"ok\":true,\"slow\":true}"); }

static void on_wait(uv_timer_t *t) {
  conn *c = t->data;
  if (file_exists("open-", c->waiting_for)) {
    uv_timer_stop(t);
    respond_text(c, 200, "{\"waited\":true}");
  }
}

static void answer(conn *c, const char *path) {
  if (strcmp(path, "/ok") == 0) {
    respond_text(c, 200, "{\"ok\":true}");
  } else if (strncmp(path, "/status/", 8) == 0) {
    int st = atoi(path + 8);
    char body[64];
    snprintf(body, sizeof body, "{\"status\":%d}", st);
    respond_text(c, st >= 100 && st <= 599 ? st : 500, body);
  } else if (strncmp(path, "/gate/", 6) == 0) {
    if (file_exists("open-", path + 6))
      respond_text(c, 200, "{\"gate\":\"open\"}");
    else
      respond_text(c, 403, "{\"gate\":\"closed\"}");
  } else if (strncmp(path, "/rollback/", 10) == 0) {
    if (file_exists("rollback-", path + 10))
      respond_text(c, 200, "{\"rollback\":true}");
    else
      respond_text(c, 404, "{\"rollback\":false}");
  } else if (strncmp(path, "/flaky/", 7) == 0) {
    flaky *f = rx.flakies;
    while (f && strcmp(f->path, path) != 0)
      f = f->next;
    if (!f && (f = calloc(1, sizeof *f))) {
      snprintf(f->path, sizeof f->path, "%s", path);
      f->next = rx.flakies;
      rx.flakies = f;
    }
    int fails = atoi(path + 7);
    if (f && f->seen++ < fails)
      respond_text(c, 500, "{\"flaky\":\"not yet\"}");
    else
      respond_text(c, 200, "{\"flaky\":\"ok\"}");
  } else if (strncmp(path, "/slow/", 6) == 0) {
    uv_timer_start(&c->timer, on_slow, (uint64_t)atol(path + 6), 0);
  } else if (strncmp(path, "/wait/", 6) == 0) {
    snprintf(c->waiting_for, sizeof c->waiting_for, "%.200s", path + 6);
    uv_timer_start(&c->timer, on_wait, 0, 20);
  } else if (strncmp(path, "/notify/", 8) == 0) {
    respond_text(c, 200, "{\"ok\":true}");
  } else if (strcmp(path, "/hang") == 0) {
    /* never answers; the connection closes when the client gives up */
  } else if (strncmp(path, "/huge/", 6) == 0) {
    respond(c, 200, "Content-Type: text/plain\r\n", NULL, (size_t)atol(path + 6));
  } else if (strcmp(path, "/redirect") == 0) {
    respond(c, 302, "Location: /ok\r\n", "", 0);
  } else if (strcmp(path, "/text") == 0) {
    respond(c, 200, "Content-Type: text/plain\r\n", "this is not JSON\n", 17);
  } else {
    respond_text(c, 404, "{\"error\":\"no such path\"}");
  }
}

static void handle(conn *c) {
  char method[16] = "", path[1024] = "";
  if (sscanf(c->in, "%15s %1023s", method, path) != 2) {
    respond_text(c, 400, "{\"error\":\"bad request line\"}");
    return;
  }
  char *q = strchr(path, '?');
  if (q)
    *q = '\0';
  const char *sig = check_signature(c);
  log_request(c, method, path, sig);
  if (strcmp(sig, "bad") == 0 || strcmp(sig, "missing") == 0) {
    respond_text(c, 401, "{\"error\":\"signature does not match\"}");
    return;
  }
  answer(c, path);
}

/* ---- reading ---- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  conn *c = h->data;
  (void)suggested;
  if (c->cap - c->len < 64 * 1024) {
    size_t cap = c->cap ? c->cap * 2 : 128 * 1024;
    char *g = realloc(c->in, cap + 1);
    if (!g) {
      *buf = uv_buf_init(NULL, 0);
      return;
    }
    c->in = g;
    c->cap = cap;
  }
  *buf = uv_buf_init(c->in + c->len, (unsigned)(c->cap - c->len));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn *c = s->data;
  (void)buf;
  if (nread < 0) {
    conn_close(c);
    return;
  }
  if (c->answered)
    return;
  c->len += (size_t)nread;
  c->in[c->len] = '\0';
  if (!c->head_len) {
    char *end = strstr(c->in, "\r\n\r\n");
    if (!end) {
      if (c->len > HEAD_CAP)
        respond_text(c, 431, "{\"error\":\"head too large\"}");
      return;
    }
    c->head_len = (size_t)(end + 4 - c->in);
    size_t len = 0;
    const char *cl = header(c, "Content-Length", &len);
    c->body_len = cl ? (size_t)strtoul(cl, NULL, 10) : 0;
    if (c->body_len > BODY_CAP) {
      respond_text(c, 413, "{\"error\":\"body too large\"}");
      return;
    }
  }
  if (c->len >= c->head_len + c->body_len) {
    uv_read_stop(s);
    handle(c);
  }
}

static void on_connection(uv_stream_t *server, int status) {
  if (status < 0)
    return;
  conn *c = calloc(1, sizeof *c);
  if (!c)
    return;
  uv_tcp_init(rx.loop, &c->tcp);
  uv_timer_init(rx.loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->handles = 2;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0)
    conn_close(c);
}

static void on_signal(uv_signal_t *s, int sig) {
  (void)s;
  (void)sig;
  uv_stop(rx.loop);
}

int main(int argc, char **argv) {
  rx.host = "127.0.0.1";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--port") == 0)
      rx.port = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--dir") == 0)
      rx.dir = argv[i + 1];
    else if (strcmp(argv[i], "--secret") == 0)
      rx.secret = argv[i + 1];
    else if (strcmp(argv[i], "--host") == 0)
      rx.host = argv[i + 1];
  }
  if (!rx.port || !rx.dir) {
    fprintf(stderr, "usage: hook-receiver --port P --dir D [--secret S] [--host 127.0.0.1]\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  rx.loop = uv_default_loop();
  struct sockaddr_in addr;
  uv_ip4_addr(rx.host, rx.port, &addr);
  uv_tcp_init(rx.loop, &rx.listener);
  int rc = uv_tcp_bind(&rx.listener, (const struct sockaddr *)&addr, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&rx.listener, 128, on_connection);
  if (rc != 0) {
    fprintf(stderr, "hook-receiver: cannot listen on %s:%d: %s\n", rx.host, rx.port, uv_strerror(rc));
    return 1;
  }
  uv_signal_init(rx.loop, &rx.sigterm);
  uv_signal_start(&rx.sigterm, on_signal, SIGTERM);
  uv_signal_init(rx.loop, &rx.sigint);
  uv_signal_start(&rx.sigint, on_signal, SIGINT);
  fprintf(stderr, "hook-receiver listening on %s:%d\n", rx.host, rx.port);
  uv_run(rx.loop, UV_RUN_DEFAULT);
  return 0;
}
