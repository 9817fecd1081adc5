/* The test provider: instances that are HTTP servers inside this process,
 * on the engine's loop (the idea of bench/engine_overhead.c's in-process
 * server, made a provider kind). Each answers every request (a health
 * check, a request of a spec) as its version's script says, on the
 * engine's clock, so a canary of hours runs on the virtual clock in a
 * fraction of a second through the real rollout, store, health checks
 * (libcurl) and router interface.
 *
 * Nothing is decided with timers: whether an instance is up, unhealthy or
 * gone is computed from the engine's clock when a request or an inspect
 * comes, so a far-off scripted moment never holds the virtual clock. An
 * instance that is not up yet, or has crashed, accepts a connection and
 * closes it at once: to a health check, a failed attempt with no status,
 * as a process that is not listening yet. Every answer of the interface
 * comes from the loop (engine_soon), never from inside the call. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "provider.h"
#include "util.h"

typedef struct tinst tinst;
typedef struct test_provider test_provider;

struct tinst {
  test_provider *tp;
  uv_tcp_t server;
  int port;
  char handle[64];
  char version[129];
  char target[64];
  int idx;
  provider_test_script script;
  double up_at;                 /* engine clock: from then on it answers */
  unsigned long requests, errors;
  tinst *next;
};

struct test_provider {
  provider base;                /* first: a provider * is a test_provider * */
  engine *e;
  provider_test_script script;
  char **versions;
  provider_test_script *scripts;
  size_t n;
  int adopt;
  tinst *instances;
};

typedef struct tconn {
  uv_tcp_t tcp;
  uv_write_t w;
  char in[1024];
  char out[320];
  size_t out_len;
} tconn;

static unsigned long serial;

void provider_test_script_default(provider_test_script *s) {
  memset(s, 0, sizeof *s);
  s->unhealthy_after = -1;
  s->crash_after = -1;
}

/* ---- answering requests ---- */

static int crashed(const tinst *i, double now) { return i->script.crash_after >= 0 && now >= i->up_at + i->script.crash_after; }

/* 500 or 200 for the next request, counted. error_rate is spread evenly:
 * request n fails when floor((n+1)*rate) > floor(n*rate). */
static int next_status(tinst *i, double now) {
  const provider_test_script *s = &i->script;
  unsigned long n = i->requests++;
  int bad = s->unhealthy || (s->unhealthy_after >= 0 && now >= i->up_at + s->unhealthy_after) ||
            floor((double)(n + 1) * s->error_rate) > floor((double)n * s->error_rate);
  if (bad)
    i->errors++;
  return bad ? 500 : 200;
}

static void conn_closed(uv_handle_t *h) { free(h->data); }

static void conn_written(uv_write_t *w, int status) {
  (void)status;
  tconn *c = w->data;
  uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void conn_alloc(uv_handle_t *h, size_t size, uv_buf_t *b) {
  (void)size;
  tconn *c = h->data;
  *b = uv_buf_init(c->in, sizeof c->in);
}

/* The answer was decided when the connection came; any request bytes
 * send it (Connection: close, so one request per connection). */
static void conn_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  (void)b;
  tconn *c = s->data;
  if (n == 0)
    return;
  uv_read_stop(s);
  if (n < 0) {
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
    return;
  }
  uv_buf_t out = uv_buf_init(c->out, (unsigned)c->out_len);
  c->w.data = c;
  if (uv_write(&c->w, s, &out, 1, conn_written) != 0)
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void on_connection(uv_stream_t *server, int status) {
  tinst *i = server->data;
  if (status < 0)
    return;
  tconn *c = calloc(1, sizeof *c);
  if (!c)
    return;
  uv_tcp_init(server->loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
    return;
  }
  double now = engine_now(i->tp->e);
  if (now < i->up_at || crashed(i, now)) {
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
    return;
  }
  int code = next_status(i, now);
  char body[160];
  int blen = snprintf(body, sizeof body, "%s\n", code == 200 ? i->version : "error");
  c->out_len = (size_t)snprintf(c->out, sizeof c->out,
                                "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                                "Connection: close\r\n\r\n%s",
                                code, code == 200 ? "OK" : "Internal Server Error", blen, body);
  uv_read_start((uv_stream_t *)&c->tcp, conn_alloc, conn_read);
}

/* ---- answers from the loop ---- */

typedef struct answer {
  test_provider *tp;
  int kind;                     /* 0 start, 1 stop, 2 inspect, 3 logs */
  void *cb;
  void *payload;
  provider_instance pi;
  int alive;
  char err[DC_ERR_MAX];
  char *text;
  struct provider_stream *stream;
} answer;

struct provider_stream {
  int stopped, sent;            /* logs_stop came; the text went out */
  provider_logs_cb cb;
  void *payload;
};

static void answer_now(void *payload) {
  answer *a = payload;
  const char *err = a->err[0] ? a->err : NULL;
  switch (a->kind) {
  case 0:
    ((provider_start_cb)a->cb)(a->payload, err ? NULL : &a->pi, err);
    break;
  case 1:
    ((provider_cb)a->cb)(a->payload, err);
    break;
  case 2:
    ((provider_inspect_cb)a->cb)(a->payload, a->alive, NULL, err);
    break;
  default: {
    struct provider_stream *s = a->stream;
    if (!s->sent && a->text) {
      s->sent = 1;
      s->cb(s->payload, a->text, strlen(a->text), 0, NULL);
    }
    /* Following: the text is all there will ever be; done at logs_stop. */
    if (s->stopped || !a->alive) {
      s->cb(s->payload, NULL, 0, 1, NULL);
      free(s);
    }
  }
  }
  free(a->text);
  free(a);
}

static int answer_later(answer *a, char *err) {
  if (engine_soon(a->tp->e, answer_now, a) != 0) {
    free(a->text);
    free(a);
    dc_fmt(err, DC_ERR_MAX, "test provider: out of memory");
    return -1;
  }
  return 0;
}

static answer *new_answer(test_provider *tp, int kind, void *cb, void *payload, char *err) {
  answer *a = calloc(1, sizeof *a);
  if (!a) {
    dc_fmt(err, DC_ERR_MAX, "test provider: out of memory");
    return NULL;
  }
  a->tp = tp;
  a->kind = kind;
  a->cb = cb;
  a->payload = payload;
  return a;
}

static tinst *find(test_provider *tp, const char *handle) {
  for (tinst *i = tp->instances; i; i = i->next)
    if (handle && strcmp(i->handle, handle) == 0)
      return i;
  return NULL;
}

static const provider_test_script *script_of(const test_provider *tp, const char *version) {
  for (size_t k = 0; k < tp->n; k++)
    if (strcmp(tp->versions[k], version) == 0)
      return &tp->scripts[k];
  return &tp->script;
}

/* ---- the interface ---- */

static void server_closed(uv_handle_t *h) { free(h->data); }

static void inst_close(tinst *i) {
  i->server.data = i;
  uv_close((uv_handle_t *)&i->server, server_closed);
}

static int tp_start(provider *p, const provider_start_req *req, provider_start_cb cb, void *payload, char *err) {
  test_provider *tp = (test_provider *)p;
  tinst *i = calloc(1, sizeof *i);
  answer *a = new_answer(tp, 0, (void *)cb, payload, err);
  if (!i || !a) {
    free(i);
    free(a);
    dc_fmt(err, DC_ERR_MAX, "test provider: out of memory");
    return -1;
  }
  i->tp = tp;
  i->script = *script_of(tp, req->inst->version);
  dc_strlcpy(i->version, req->inst->version, sizeof i->version);
  dc_strlcpy(i->target, req->inst->target, sizeof i->target);
  i->idx = req->inst->idx;
  double now = engine_now(tp->e);
  i->up_at = now + i->script.start_time;
  struct sockaddr_in addr;
  struct sockaddr_storage bound;
  int len = sizeof bound;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_tcp_init(tp->e->loop, &i->server);
  i->server.data = i;
  int rc = uv_tcp_bind(&i->server, (const struct sockaddr *)&addr, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&i->server, 64, on_connection);
  if (rc == 0)
    rc = uv_tcp_getsockname(&i->server, (struct sockaddr *)&bound, &len);
  if (rc != 0) {
    /* A failure of the world: reported through the callback. */
    dc_fmt(a->err, sizeof a->err, "test provider: cannot listen on 127.0.0.1: %s", uv_strerror(rc));
    inst_close(i);
    return answer_later(a, err);
  }
  i->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
  dc_fmt(i->handle, sizeof i->handle, "test:%d:%lu", (int)getpid(), ++serial);
  i->next = tp->instances;
  tp->instances = i;
  dc_strlcpy(a->pi.host, "127.0.0.1", sizeof a->pi.host);
  a->pi.port = i->port;
  dc_strlcpy(a->pi.handle, i->handle, sizeof a->pi.handle);
  a->pi.pid = (int)getpid();
  a->pi.started_at = now;
  return answer_later(a, err);
}

static int tp_stop(provider *p, const store_instance *inst, provider_cb cb, void *payload, char *err) {
  test_provider *tp = (test_provider *)p;
  answer *a = new_answer(tp, 1, (void *)cb, payload, err);
  if (!a)
    return -1;
  for (tinst **pp = &tp->instances; *pp; pp = &(*pp)->next) {
    if (strcmp((*pp)->handle, inst->handle) == 0) {
      tinst *i = *pp;
      *pp = i->next;
      inst_close(i);
      break;
    }
  }
  return answer_later(a, err);
}

static int tp_inspect(provider *p, const store_instance *inst, provider_inspect_cb cb, void *payload, char *err) {
  test_provider *tp = (test_provider *)p;
  answer *a = new_answer(tp, 2, (void *)cb, payload, err);
  if (!a)
    return -1;
  tinst *i = find(tp, inst->handle);
  a->alive = i ? !crashed(i, engine_now(tp->e)) : tp->adopt;
  return answer_later(a, err);
}

static int tp_logs(provider *p, const store_instance *inst, int lines, int follow, provider_logs_cb cb, void *payload,
                   provider_stream **out, char *err) {
  (void)lines;
  test_provider *tp = (test_provider *)p;
  struct provider_stream *s = calloc(1, sizeof *s);
  answer *a = s ? new_answer(tp, 3, NULL, NULL, err) : NULL;
  if (!a) {
    free(s);
    dc_fmt(err, DC_ERR_MAX, "test provider: out of memory");
    return -1;
  }
  s->cb = cb;
  s->payload = payload;
  a->stream = s;
  a->alive = follow;
  tinst *i = find(tp, inst->handle);
  dc_buf b = {0};
  if (i)
    dc_buf_printf(&b, "test instance %s-%s-%d on 127.0.0.1:%d (in deployctl's process): %lu requests, %lu answered 500\n",
                  i->target, i->version, i->idx, i->port, i->requests, i->errors);
  else
    dc_buf_printf(&b, "(no log: %s-%s-%d was not started by this test provider)\n", inst->target, inst->version,
                  inst->idx);
  a->text = dc_buf_take(&b);
  if (out)
    *out = s;
  return answer_later(a, err);
}

static void tp_logs_stop(provider *p, provider_stream *s) {
  test_provider *tp = (test_provider *)p;
  if (!s || s->stopped)
    return;
  s->stopped = 1;
  if (!s->sent)
    return; /* the pending answer sends the text, then done */
  answer *a = calloc(1, sizeof *a);
  char err[DC_ERR_MAX];
  if (!a)
    return;
  a->tp = tp;
  a->kind = 3;
  a->stream = s;
  answer_later(a, err);
}

static void tp_free(provider *p) {
  test_provider *tp = (test_provider *)p;
  if (!tp)
    return;
  /* Its instances end with it: manager:close() stops what the test
   * provider started. */
  while (tp->instances) {
    tinst *i = tp->instances;
    tp->instances = i->next;
    inst_close(i);
  }
  for (size_t k = 0; k < tp->n; k++)
    free(tp->versions[k]);
  free(tp->versions);
  free(tp->scripts);
  free(tp);
}

static int check_script(const provider_test_script *s, const char *what, char *err) {
  const char *bad = !(s->start_time >= 0 && s->start_time < 1e9) ? "start_time must be a number of seconds >= 0"
                    : !(s->error_rate >= 0 && s->error_rate <= 1) ? "error_rate must be between 0 and 1"
                    : !(s->unhealthy_after < 1e9) ? "unhealthy_after must be a number of seconds >= 0"
                    : !(s->crash_after < 1e9) ? "crash_after must be a number of seconds >= 0"
                                              : NULL;
  if (bad)
    dc_fmt(err, DC_ERR_MAX, "deploy: test provider %s: %s", what, bad);
  return bad ? -1 : 0;
}

int provider_test_new(provider **out, engine *e, const provider_test_opts *o, char *err) {
  *out = NULL;
  if (check_script(&o->script, "script", err) != 0)
    return -1;
  for (size_t k = 0; k < o->n; k++)
    if (check_script(&o->scripts[k], o->versions[k], err) != 0)
      return -1;
  test_provider *tp = calloc(1, sizeof *tp);
  if (tp && o->n) {
    tp->versions = calloc(o->n, sizeof *tp->versions);
    tp->scripts = calloc(o->n, sizeof *tp->scripts);
  }
  if (!tp || (o->n && (!tp->versions || !tp->scripts))) {
    if (tp) {
      free(tp->versions);
      free(tp->scripts);
    }
    free(tp);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory creating the test provider");
    return -1;
  }
  for (size_t k = 0; k < o->n; k++) {
    tp->versions[k] = strdup(o->versions[k]);
    tp->scripts[k] = o->scripts[k];
    tp->n = k + 1;
    if (!tp->versions[k]) {
      tp_free(&tp->base);
      dc_fmt(err, DC_ERR_MAX, "deploy: out of memory creating the test provider");
      return -1;
    }
  }
  tp->e = e;
  tp->script = o->script;
  tp->adopt = o->adopt;
  tp->base.version = PROVIDER_VERSION;
  tp->base.kind = "test";
  tp->base.on_engine_clock = 1;
  tp->base.start = tp_start;
  tp->base.stop = tp_stop;
  tp->base.inspect = tp_inspect;
  tp->base.logs = tp_logs;
  tp->base.logs_stop = tp_logs_stop;
  tp->base.free = tp_free;
  *out = &tp->base;
  return 0;
}

int provider_test_stats(const provider *p, const char *version, unsigned long *requests, unsigned long *errors) {
  *requests = *errors = 0;
  if (!p || p->start != tp_start)
    return -1;
  const test_provider *tp = (const test_provider *)p;
  for (const tinst *i = tp->instances; i; i = i->next) {
    if (version && strcmp(version, i->version) != 0)
      continue;
    *requests += i->requests;
    *errors += i->errors;
  }
  return 0;
}
