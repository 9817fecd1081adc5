/* The HAProxy router: drives one backend through HAProxy's runtime API, the
 * stats socket (management.txt §9.3). Each command gets its own connection:
 * in non-interactive mode HAProxy answers one command and closes, so an
 * answer is complete at EOF. Why the commands come in this order, and what
 * HAProxy 2.6 answers, is in notes/haproxy.md.
 *
 * The socket is reached one of three ways, chosen by router.socket:
 *   /path                 a unix socket of this machine;
 *   tcp://ADDR:PORT       HAProxy's `stats socket ipv4@ADDR:PORT` (or
 *                         ipv6@[ADDR]:PORT) on another machine;
 *   ssh://DEST/path       a unix socket on an ssh destination: its master
 *                         connection (ssh.c, shared with the target's
 *                         hosts) forwards a local socket to it (OpenSSH
 *                         stream-local forwarding), made on first use and
 *                         again when its master has gone.
 * Only the connection differs; commands and answers are the same. */
#include "router.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ssh.h"
#include "util.h"

#define HAP_CMD_MAX 512
#define HAP_READ_CHUNK 65536
#define HAP_ANSWER_MAX (16u << 20)  /* one backend's stats are far smaller */
#define HAP_POLL_MS 50              /* drain polling and del retries */
#define HAP_FINAL_DEL_MS 2000       /* after shutdown sessions, streams die
                                     * asynchronously: a short last wait */
#define HAP_MAX_COLS 256
/* The server of haproxy.cfg that testers' requests go to (README): not one
 * of ours by prefix, so no apply ever retires it. */
#define HAP_TEST_SLOT "deployctl-test"
#define HAP_ROLE_STICKY "sticky"          /* map values: what a key is for */
#define HAP_ROLE_TEST "test_route"

/* srv_admin_state bits (management.txt, "show servers state") that keep a
 * server from taking new traffic and that `state ready` clears. */
#define HAP_ADM_FMAINT 0x01
#define HAP_ADM_CMAINT 0x04
#define HAP_ADM_FDRAIN 0x08
#define HAP_ADM_NOT_READY (HAP_ADM_FMAINT | HAP_ADM_CMAINT | HAP_ADM_FDRAIN)

typedef struct hap hap;

/* ---- one command on the stats socket ------------------------------------- */

/* err set: the command could not be run (a full message); else answer is
 * HAProxy's whole answer, NUL-terminated and writable. */
typedef void (*hap_done)(hap *h, void *op, const char *err, char *answer);

typedef struct hap_cmd {
  struct hap_cmd *next;
  struct hap_cmd *fwd_next;  /* waiting for the ssh forward */
  hap *h;
  void *op;            /* NULL once detached by free: the answer is dropped */
  hap_done done;
  union {              /* initialised when the command connects */
    uv_handle_t handle;
    uv_stream_t stream;
    uv_pipe_t pipe;
    uv_tcp_t tcp;
  } conn_h;
  int conn_open;       /* conn_h was initialised */
  char *late_err;      /* a failure found while starting: reported by the timer, from the loop */
  uv_timer_t timer;
  uv_connect_t conn;
  uv_write_t wr;
  char text[HAP_CMD_MAX];
  char *payload;       /* lines sent after the command (`add map ... <<`), or NULL */
  char *buf;
  size_t len, cap;
  int finished;
  int open_handles;    /* the memory goes when both handles are closed */
} hap_cmd;

/* ---- apply and read operations ------------------------------------------- */

typedef struct hap_srv {  /* one of our servers as HAProxy has it now */
  char name[64];
  char addr[64];
  int port;
  int admin;              /* srv_admin_state */
  int weight;             /* srv_uweight */
} hap_srv;

/* STEP_COOKIES reads the servers' dynamic cookies for sticky canaries;
 * STEP_MAP makes deployctl's map hold exactly what the routes need. */
typedef enum { STEP_CMD, STEP_DRAIN, STEP_DEL, STEP_COOKIES, STEP_MAP } step_kind;
/* What a successful answer looks like: most commands answer an empty line,
 * a few answer a fixed sentence (checked on HAProxy 2.6.12). */
typedef enum { ANS_EMPTY, ANS_ADD, ANS_ADDR } answer_kind;

typedef struct hap_step {
  step_kind kind;
  answer_kind answer;
  char name[64];          /* STEP_DEL: the server retired */
  char text[HAP_CMD_MAX];
} hap_step;

/* One line of deployctl's map: key, then the rest of the line. */
typedef struct map_entry {
  char *key;
  char *value;
} map_entry;

typedef struct map_list {
  map_entry *v;
  size_t n, cap;
} map_list;

typedef struct apply_op {
  struct apply_op *next;
  router_cb cb;
  void *payload;
  router_server *want;
  size_t nwant;
  route_rules routes;
  int planned;            /* the plan exists: live state was read */
  int slot_admin;         /* the testers' server: its srv_admin_state, -1 absent */
  map_list map_now;       /* the map as read before the plan */
  map_list map_want;      /* what it must hold: the plan's, then the cookies' */
  int map_phase;          /* STEP_MAP: 0 prepare, 1 add, 2 commit */
  char map_ver[24];
  hap_step *steps;
  size_t nsteps, cap, cur;
  uint64_t drain_deadline, del_deadline, final_deadline;  /* uv_now ms */
  int del_phase;          /* 0 del, 1 shutdown sessions due, 2 final del */
  char err[DC_ERR_MAX];
} apply_op;

typedef struct read_op {
  struct read_op *next;
  router_cb cb;
  void *payload;
  router_server *out;     /* read: "show servers state" */
  router_stat *stats;     /* stats: "show stat", instead */
  size_t cap;
  size_t *n;
} read_op;

typedef enum { HAP_UNIX, HAP_TCP, HAP_SSH } hap_transport;
typedef enum { FWD_NONE, FWD_PENDING, FWD_READY } fwd_state;

struct hap {
  router base;            /* first: a router * is a hap * */
  engine *e;
  char socket[512];       /* as configured, for messages */
  hap_transport transport;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];  /* unix: ours; ssh: the host's */
  struct sockaddr_storage addr;  /* tcp */
  char dest[256];         /* ssh */
  ssh_ctx *ssh;           /* ssh: borrowed, outlives the router */
  fwd_state fwd;
  char fwd_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  ssh_op *fwd_op;
  hap_cmd *fwd_waiting;   /* commands waiting for the forward */
  int fwd_held;           /* a forward in flight keeps h alive */
  char backend[128];
  char prefix[64];
  char map[512];          /* "" weights only */
  char label[700];
  uint64_t timeout_ms, drain_ms;
  uv_timer_t wait;        /* the running apply's pauses; also starts it */
  unsigned open_handles;  /* h is freed when closing and this reaches 0 */
  int closing;
  hap_cmd *cmds;
  apply_op *running, *queue, *queue_tail;  /* one apply at a time, FIFO */
  read_op *reads;
};

/* ---- small text helpers -------------------------------------------------- */

static int is_space(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Trims in place; returns the first non-blank character. */
static char *trim(char *s) {
  while (is_space(*s))
    s++;
  size_t n = strlen(s);
  while (n > 0 && is_space(s[n - 1]))
    s[--n] = '\0';
  return s;
}

static int starts_with(const char *s, const char *prefix) {
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Cuts the field up to sep off *p, NUL-terminating it in place. */
static char *cut(char **p, char sep) {
  char *s = *p;
  char *e = strchr(s, sep);
  if (e != NULL) {
    *e = '\0';
    *p = e + 1;
  } else {
    *p = s + strlen(s);
  }
  return s;
}

/* Like cut(p, ','), but a field in double quotes may hold commas. */
static char *cut_csv(char **p) {
  char *s = *p;
  if (*s != '"')
    return cut(p, ',');
  char *r = s + 1, *w = s;
  while (*r != '\0' && !(r[0] == '"' && r[1] != '"')) {
    if (r[0] == '"')
      r++;            /* "" is one quote */
    *w++ = *r++;
  }
  if (*r == '"')
    r++;
  *p = *r == ',' ? r + 1 : r;
  *w = '\0';
  return s;
}

/* HAProxy's proxy and server names: letters, digits, '_', '-', '.', ':'. */
static int valid_name(const char *s) {
  if (*s == '\0')
    return 0;
  for (; *s != '\0'; s++) {
    char c = *s;
    int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
             (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.' ||
             c == ':';
    if (!ok)
      return 0;
  }
  return 1;
}

static int addr_family(const char *ip) {
  unsigned char bin[16];
  if (inet_pton(AF_INET, ip, bin) == 1)
    return AF_INET;
  if (inet_pton(AF_INET6, ip, bin) == 1)
    return AF_INET6;
  return 0;
}

/* HAProxy prints addresses its own way ("::1"), so compare them binary. */
static int same_addr(const char *a, const char *b) {
  unsigned char x[16], y[16];
  int fa = addr_family(a);
  if (fa == 0 || fa != addr_family(b))
    return strcmp(a, b) == 0;
  inet_pton(fa, a, x);
  inet_pton(fa, b, y);
  return memcmp(x, y, fa == AF_INET ? 4 : 16) == 0;
}

/* ---- messages ------------------------------------------------------------ */

static const char *uv_reason(int status) {
  switch (status) {
  case UV_ENOENT: return "no such file";
  case UV_ECONNREFUSED: return "connection refused";
  case UV_EACCES: return "permission denied";
  default: return uv_strerror(status);
  }
}

static void msg_no_backend(const hap *h, char *err) {
  dc_fmt(err, DC_ERR_MAX,
         "haproxy: no backend '%s' in the HAProxy behind %s (declare it in "
         "haproxy.cfg: 'backend %s' with 'balance roundrobin')",
         h->backend, h->socket, h->backend);
}

/* An answer that is not the success we expected: verbatim, with the
 * command, except where HAProxy's words hide the fix. */
static void msg_answered(const hap *h, const char *cmd, char *answer,
                         char *err) {
  char *t = trim(answer);
  if (strstr(t, "Can't find backend") || strstr(t, "No such backend") ||
      strstr(t, "No such proxy")) {
    msg_no_backend(h, err);
  } else if (strstr(t, "dynamic load balancing")) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: backend '%s' cannot take servers at runtime: '%s' "
           "answered: %s (declare it with 'balance roundrobin')",
           h->backend, cmd, t);
  } else {
    /* whatever answered may not be HAProxy: its bytes are shown escaped,
     * and only the start of them */
    char *shown = dc_printable(t);
    size_t n = shown ? strlen(shown) : 0;
    dc_fmt(err, DC_ERR_MAX, "haproxy: '%s' on %s answered: %.300s%s", cmd, h->socket, shown ? shown : "?",
           n > 300 ? "..." : "");
    free(shown);
  }
}

/* ---- commands ------------------------------------------------------------ */

static void hap_release(hap *h) {
  if (h->closing && h->open_handles == 0 && !h->fwd_held)
    free(h);
}

static void cmd_handle_closed(uv_handle_t *handle) {
  hap_cmd *c = handle->data;
  hap *h = c->h;
  h->open_handles--;
  if (--c->open_handles == 0) {
    free(c->buf);
    free(c->late_err);
    free(c->payload);
    free(c);
  }
  hap_release(h);
}

static void cmd_unlink(hap_cmd *c) {
  hap_cmd **pp = &c->h->cmds;
  while (*pp != NULL && *pp != c)
    pp = &(*pp)->next;
  if (*pp == c)
    *pp = c->next;
}

static void fwd_unwait(hap_cmd *c) {
  hap_cmd **pp = &c->h->fwd_waiting;
  while (*pp != NULL && *pp != c)
    pp = &(*pp)->fwd_next;
  if (*pp == c)
    *pp = c->fwd_next;
}

static void cmd_close(hap_cmd *c) {
  c->finished = 1;
  cmd_unlink(c);
  fwd_unwait(c);
  uv_close((uv_handle_t *)&c->timer, cmd_handle_closed);
  if (c->conn_open)
    uv_close(&c->conn_h.handle, cmd_handle_closed);
}

/* Ends the command once; the handles close, the memory goes later, so
 * answer stays valid during done even if done frees the router. */
static void cmd_finish(hap_cmd *c, const char *err, char *answer) {
  if (c->finished)
    return;
  cmd_close(c);
  if (c->op != NULL)
    c->done(c->h, c->op, err, answer);
}

static void cmd_fail_io(hap_cmd *c, const char *what, int status) {
  char err[DC_ERR_MAX];
  dc_fmt(err, DC_ERR_MAX, "haproxy: '%s' failed on %s: %s: %s", c->text,
         c->h->socket, what, uv_strerror(status));
  cmd_finish(c, err, NULL);
}

static void cmd_on_timeout(uv_timer_t *t) {
  hap_cmd *c = t->data;
  char err[DC_ERR_MAX];
  if (c->late_err != NULL) {
    cmd_finish(c, c->late_err, NULL);
    return;
  }
  dc_fmt(err, DC_ERR_MAX,
         "haproxy: '%s' got no answer from %s within %.3g s (is HAProxy "
         "overloaded or stopped?)",
         c->text, c->h->socket, (double)c->h->timeout_ms / 1000.0);
  cmd_finish(c, err, NULL);
}

static void cmd_on_alloc(uv_handle_t *handle, size_t hint, uv_buf_t *buf) {
  (void)hint;
  hap_cmd *c = handle->data;
  *buf = uv_buf_init(NULL, 0);   /* libuv reports UV_ENOBUFS to on_read */
  if (c->cap - c->len < HAP_READ_CHUNK + 1) {
    size_t cap = c->cap + HAP_READ_CHUNK + 1;
    char *p = cap <= HAP_ANSWER_MAX ? realloc(c->buf, cap) : NULL;
    if (p == NULL)
      return;
    c->buf = p;
    c->cap = cap;
  }
  /* One byte stays free for the terminating NUL. */
  *buf = uv_buf_init(c->buf + c->len, (unsigned)(c->cap - c->len - 1));
}

/* What the socket must be to answer, for messages. */
static const char *socket_hint(const hap *h, char *buf, size_t size) {
  if (h->transport == HAP_TCP)
    dc_fmt(buf, size, "is HAProxy running there with 'stats socket ipv4@ADDR:PORT level admin' (ipv6@ for IPv6)?");
  else if (h->transport == HAP_SSH)
    dc_fmt(buf, size, "is HAProxy running on '%s' with 'stats socket %s level admin'?", h->dest, h->path);
  else
    dc_fmt(buf, size, "is HAProxy running with 'stats socket %s level admin'?", h->socket);
  return buf;
}

static void cmd_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  hap_cmd *c = s->data;
  if (c->finished)
    return;
  if (nread > 0) {
    c->len += (size_t)nread;
  } else if (nread == UV_EOF) {
    char err[DC_ERR_MAX];
    c->buf[c->len] = '\0';
    /* Every answer has at least a newline, and a "show" answer ends with
     * an empty line: anything shorter was cut (HAProxy stopping, a proxy
     * or a full buffer in between) and must not be read as the state. */
    if (c->len == 0 && c->h->transport == HAP_SSH) {
      /* a forwarded connection that the host side could not open */
      char hint[256];
      dc_fmt(err, DC_ERR_MAX, "haproxy: '%s' got no answer through %s: the connection was closed at once (%s)",
             c->text, c->h->socket, socket_hint(c->h, hint, sizeof hint));
      cmd_finish(c, err, NULL);
    } else if (c->len == 0) {
      dc_fmt(err, DC_ERR_MAX,
             "haproxy: '%s' on %s: the connection closed without an answer (HAProxy restarting or stopping?)",
             c->text, c->h->socket);
      cmd_finish(c, err, NULL);
    } else if (strncmp(c->text, "show ", 5) == 0 && !(c->len == 1 && c->buf[0] == '\n') &&
               (c->len < 2 || memcmp(c->buf + c->len - 2, "\n\n", 2) != 0)) {
      /* (a lone empty line is a whole answer: "show map" of an empty map) */
      dc_fmt(err, DC_ERR_MAX,
             "haproxy: '%s' on %s: the answer was cut short after %zu bytes (no closing empty line): "
             "nothing is read from it",
             c->text, c->h->socket, c->len);
      cmd_finish(c, err, NULL);
    } else {
      cmd_finish(c, NULL, c->buf);
    }
  } else if (nread < 0) {
    cmd_fail_io(c, "reading the answer", (int)nread);
  }
}

static void cmd_on_write(uv_write_t *req, int status) {
  hap_cmd *c = req->data;
  if (!c->finished && status < 0)
    cmd_fail_io(c, "sending", status);
}

static void cmd_on_connect(uv_connect_t *req, int status) {
  hap_cmd *c = req->data;
  if (c->finished)
    return;
  if (status < 0) {
    char err[DC_ERR_MAX], hint[256];
    /* The master behind a forward has gone: the next command makes a new
     * one. */
    if (c->h->transport == HAP_SSH && c->h->fwd == FWD_READY)
      c->h->fwd = FWD_NONE;
    dc_fmt(err, DC_ERR_MAX, "haproxy: cannot connect to %s: %s (%s)", c->h->socket, uv_reason(status),
           socket_hint(c->h, hint, sizeof hint));
    cmd_finish(c, err, NULL);
    return;
  }
  uv_buf_t bufs[3] = {uv_buf_init(c->text, (unsigned)strlen(c->text)),
                      uv_buf_init("\n", 1),
                      uv_buf_init(c->payload, c->payload ? (unsigned)strlen(c->payload) : 0)};
  int rc = uv_write(&c->wr, &c->conn_h.stream, bufs, c->payload ? 3 : 2, cmd_on_write);
  if (rc < 0) {
    cmd_fail_io(c, "sending", rc);
    return;
  }
  rc = uv_read_start(&c->conn_h.stream, cmd_on_alloc, cmd_on_read);
  if (rc < 0)
    cmd_fail_io(c, "reading the answer", rc);
}

/* Ends the command with err from the loop (its timer, at once), never
 * inside the call that started it. */
static void cmd_fail_late(hap_cmd *c, const char *err) {
  free(c->late_err);
  c->late_err = strdup(err);
  uv_timer_stop(&c->timer);
  if (c->late_err == NULL)
    cmd_finish(c, "haproxy: out of memory", NULL);
  else
    uv_timer_start(&c->timer, cmd_on_timeout, 0, 0);
}

/* Opens the command's connection to a unix socket path (ours, or the
 * forward's). Errors, even a missing file, come back through
 * cmd_on_connect. */
static void cmd_connect_pipe(hap_cmd *c, const char *path) {
  uv_pipe_init(c->h->e->loop, &c->conn_h.pipe, 0);
  c->conn_h.handle.data = c;
  c->conn_open = 1;
  c->open_handles++;
  c->h->open_handles++;
  uv_pipe_connect(&c->conn, &c->conn_h.pipe, path, cmd_on_connect);
}

static void cmd_fail_late(hap_cmd *c, const char *err);

static void cmd_connect_tcp(hap_cmd *c) {
  uv_tcp_init(c->h->e->loop, &c->conn_h.tcp);
  c->conn_h.handle.data = c;
  c->conn_open = 1;
  c->open_handles++;
  c->h->open_handles++;
  int rc = uv_tcp_connect(&c->conn, &c->conn_h.tcp, (const struct sockaddr *)&c->h->addr, cmd_on_connect);
  if (rc < 0) {
    char err[DC_ERR_MAX], hint[256];
    dc_fmt(err, DC_ERR_MAX, "haproxy: cannot connect to %s: %s (%s)", c->h->socket, uv_reason(rc),
           socket_hint(c->h, hint, sizeof hint));
    cmd_fail_late(c, err);
  }
}

/* ---- the ssh forward ----------------------------------------------------- */

static void fwd_request(hap *h);

/* 1 while something listens on the forward's socket (a master that died
 * leaves the file behind, refusing connections). */
static int fwd_alive(const char *path) {
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  memcpy(sa.sun_path, path, strlen(path) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0)
    return 0;
  int alive = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EAGAIN;
  close(fd);
  return alive;
}

static void fwd_done(void *payload, const ssh_result *r, const char *err) {
  hap *h = payload;
  char msg[DC_ERR_MAX];
  h->fwd_op = NULL;
  h->fwd_held = 0;
  if (h->closing) {
    hap_release(h);
    return;
  }
  if (!err && r->exit_status != 0) {
    dc_fmt(msg, sizeof msg, "ssh: '%s' refused to forward a connection to %s: %.*s", h->dest, h->path,
           (int)(r->err_len > 200 ? 200 : r->err_len), r->err_text);
    err = msg;
  }
  h->fwd = err ? FWD_NONE : FWD_READY;
  hap_cmd *w = h->fwd_waiting;
  h->fwd_waiting = NULL;
  while (w != NULL) {
    hap_cmd *next = w->fwd_next;
    w->fwd_next = NULL;
    if (err) {
      char full[DC_ERR_MAX];
      dc_fmt(full, sizeof full, "haproxy: cannot reach %s: %s", h->socket, err);
      cmd_finish(w, full, NULL);
    } else {
      cmd_connect_pipe(w, h->fwd_path);
    }
    w = next;
  }
}

static void fwd_request(hap *h) {
  char err[DC_ERR_MAX];
  if (h->fwd == FWD_PENDING)
    return;
  h->fwd = FWD_PENDING;
  /* Bounded by the commands' own timeouts; the master's connect has its
   * own deadline in ssh.c. */
  if (ssh_forward(&h->fwd_op, h->ssh, h->dest, h->path, h->fwd_path, sizeof h->fwd_path, 0, fwd_done, h, err) != 0) {
    char full[DC_ERR_MAX];
    dc_fmt(full, sizeof full, "haproxy: cannot reach %s: %s", h->socket, err);
    h->fwd = FWD_NONE;
    hap_cmd *w = h->fwd_waiting;
    h->fwd_waiting = NULL;
    for (; w != NULL; w = w->fwd_next)
      cmd_fail_late(w, full);
    return;
  }
  h->fwd_held = 1;
}

static void cmd_connect(hap_cmd *c) {
  hap *h = c->h;
  switch (h->transport) {
  case HAP_UNIX:
    cmd_connect_pipe(c, h->path);
    return;
  case HAP_TCP:
    cmd_connect_tcp(c);
    return;
  case HAP_SSH:
    if (h->fwd == FWD_READY && !fwd_alive(h->fwd_path))
      h->fwd = FWD_NONE;
    if (h->fwd == FWD_READY) {
      cmd_connect_pipe(c, h->fwd_path);
      return;
    }
    c->fwd_next = h->fwd_waiting;
    h->fwd_waiting = c;
    fwd_request(h);
    return;
  }
}

/* Sends one command, with payload lines after it (taken: freed with the
 * command) when not NULL; done runs once, from the loop. -1 only when out
 * of memory (done does not run then). */
static int cmd_start_payload(hap *h, void *op, const char *text, char *payload, hap_done done, char *err) {
  hap_cmd *c = calloc(1, sizeof *c);
  char *buf = malloc(HAP_READ_CHUNK + 1);
  if (c == NULL || buf == NULL) {
    free(c);
    free(buf);
    free(payload);
    dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
    return DC_ERROR;
  }
  c->payload = payload;
  c->h = h;
  c->op = op;
  c->done = done;
  c->buf = buf;
  c->cap = HAP_READ_CHUNK + 1;
  dc_strlcpy(c->text, text, sizeof c->text);
  uv_timer_init(h->e->loop, &c->timer);
  c->timer.data = c->conn.data = c->wr.data = c;
  c->open_handles = 1;
  h->open_handles += 1;
  c->next = h->cmds;
  h->cmds = c;
  uv_timer_start(&c->timer, cmd_on_timeout, h->timeout_ms, 0);
  cmd_connect(c);
  return DC_OK;
}

static int cmd_start(hap *h, void *op, const char *text, hap_done done, char *err) {
  return cmd_start_payload(h, op, text, NULL, done, err);
}

/* ---- parsing ------------------------------------------------------------- */

typedef struct state_cols {
  int name, addr, port, admin, weight;
} state_cols;

static int col_index(char **cols, int ncols, const char *name) {
  for (int i = 0; i < ncols; i++)
    if (strcmp(cols[i], name) == 0)
      return i;
  return -1;
}

static int split_fields(char *line, char sep, char **f, int max) {
  int n = 0;
  while (n < max && *line != '\0') {
    f[n] = sep == ',' ? cut_csv(&line) : cut(&line, sep);
    if (sep != ',' && *f[n] == '\0')
      continue;      /* runs of spaces */
    n++;
  }
  return n;
}

static int state_header(char *line, state_cols *c) {
  char *f[HAP_MAX_COLS];
  int n = split_fields(line + 1, ' ', f, HAP_MAX_COLS);
  c->name = col_index(f, n, "srv_name");
  c->addr = col_index(f, n, "srv_addr");
  c->port = col_index(f, n, "srv_port");
  c->admin = col_index(f, n, "srv_admin_state");
  c->weight = col_index(f, n, "srv_uweight");
  return c->name < 0 || c->addr < 0 || c->port < 0 || c->admin < 0 ||
                 c->weight < 0
             ? -1
             : 0;
}

static int push_srv(hap_srv **v, size_t *n, size_t *cap, const hap_srv *s) {
  if (*n == *cap) {
    size_t ncap = *cap ? *cap * 2 : 8;
    hap_srv *p = realloc(*v, ncap * sizeof *p);
    if (p == NULL)
      return DC_ERROR;
    *v = p;
    *cap = ncap;
  }
  (*v)[(*n)++] = *s;
  return DC_OK;
}

/* One data line of "show servers state"; 1 when it is one of ours, 2 for
 * the testers' server, -1 when it names one of ours in a way HAProxy never
 * would (s->name then shows it, non-printable bytes as '?'): every name of
 * ours is sent back in commands, and HAProxy's CLI would read
 * "dc_1;disable frontend fe" as two commands. */
static int state_line(const hap *h, char *line, const state_cols *c,
                      hap_srv *s) {
  char *f[HAP_MAX_COLS];
  int n = split_fields(line, ' ', f, HAP_MAX_COLS);
  if (n <= c->name || n <= c->addr || n <= c->port || n <= c->admin ||
      n <= c->weight)
    return 0;
  int slot = strcmp(f[c->name], HAP_TEST_SLOT) == 0;
  if (!slot && !starts_with(f[c->name], h->prefix))
    return 0;
  memset(s, 0, sizeof *s);
  if (!valid_name(f[c->name]) || strlen(f[c->name]) >= sizeof s->name) {
    dc_strlcpy(s->name, f[c->name], sizeof s->name);
    for (char *p = s->name; *p != '\0'; p++)
      if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f)
        *p = '?';
    return -1;
  }
  dc_strlcpy(s->name, f[c->name], sizeof s->name);
  dc_strlcpy(s->addr, f[c->addr], sizeof s->addr);
  s->port = atoi(f[c->port]);
  s->admin = atoi(f[c->admin]);
  s->weight = atoi(f[c->weight]);
  return slot ? 2 : 1;
}

/* Our servers from a "show servers state <backend>" answer: a version
 * line, a '#' header naming the columns, one line per server; *slot_admin
 * (when not NULL) the testers' server's admin state, -1 when absent. */
static int parse_state(const hap *h, const char *cmd, char *answer,
                       hap_srv **out, size_t *n, int *slot_admin, char *err) {
  hap_srv *v = NULL;
  size_t cap = 0;
  state_cols cols;
  int have_cols = 0, kind;
  char *rest = answer;
  *out = NULL;
  *n = 0;
  if (slot_admin != NULL)
    *slot_admin = -1;
  if (!(answer[0] >= '0' && answer[0] <= '9')) {
    msg_answered(h, cmd, answer, err);
    return DC_ERROR;
  }
  cut(&rest, '\n');   /* format version */
  while (*rest != '\0') {
    char *line = cut(&rest, '\n');
    hap_srv s;
    if (line[0] == '#') {
      if (state_header(line, &cols) < 0) {
        dc_fmt(err, DC_ERR_MAX,
               "haproxy: '%s' lacks srv_name, srv_addr, srv_port, "
               "srv_admin_state or srv_uweight (HAProxy 2.6 or later needed)",
               cmd);
        free(v);
        return DC_ERROR;
      }
      have_cols = 1;
    } else if (!have_cols) {
      continue;
    } else if ((kind = state_line(h, line, &cols, &s)) < 0) {
      dc_fmt(err, DC_ERR_MAX,
             "haproxy: '%s' answered a server '%s' whose name HAProxy does "
             "not allow (letters, digits, '_', '-', '.', ':', at most 63 "
             "bytes): nothing is sent back with it (is %s HAProxy's stats "
             "socket? if so, rename or delete that server)",
             cmd, s.name, h->socket);
      free(v);
      return DC_ERROR;
    } else if (kind == 2) {
      if (slot_admin != NULL)
        *slot_admin = s.admin;
    } else if (kind == 1 && push_srv(&v, n, &cap, &s) < 0) {
      dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
      free(v);
      return DC_ERROR;
    }
  }
  *out = v;
  return DC_OK;
}

/* ---- apply: the plan ----------------------------------------------------- */

static hap_step *step_add(apply_op *op, step_kind kind, answer_kind answer,
                          const char *name, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static hap_step *step_add(apply_op *op, step_kind kind, answer_kind answer,
                          const char *name, const char *fmt, ...) {
  if (op->nsteps == op->cap) {
    size_t ncap = op->cap ? op->cap * 2 : 16;
    hap_step *p = realloc(op->steps, ncap * sizeof *p);
    if (p == NULL)
      return NULL;
    op->steps = p;
    op->cap = ncap;
  }
  hap_step *s = &op->steps[op->nsteps++];
  s->kind = kind;
  s->answer = answer;
  dc_strlcpy(s->name, name, sizeof s->name);
  va_list ap;
  va_start(ap, fmt);
  dc_vfmt(s->text, sizeof s->text, fmt, ap);
  va_end(ap);
  return s;
}

static const hap_srv *find_live(const hap_srv *live, size_t n,
                                const char *name) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(live[i].name, name) == 0)
      return &live[i];
  return NULL;
}

static int is_wanted(const apply_op *op, const char *name) {
  for (size_t i = 0; i < op->nwant; i++)
    if (strcmp(op->want[i].name, name) == 0)
      return 1;
  return 0;
}

/* Step 1: servers missing are added (in maintenance, weight already
 * final), then enabled; a server of ours at a stale address is moved. */
static int plan_add(const hap *h, apply_op *op, const hap_srv *live,
                    size_t nlive) {
  int ok = 1;
  for (size_t i = 0; i < op->nwant && ok; i++) {
    const router_server *w = &op->want[i];
    const hap_srv *l = find_live(live, nlive, w->name);
    int v6 = addr_family(w->host) == AF_INET6;
    if (l == NULL) {
      ok = step_add(op, STEP_CMD, ANS_ADD, w->name,
                    "add server %s/%s %s%s%s:%d weight %d", h->backend,
                    w->name, v6 ? "[" : "", w->host, v6 ? "]" : "", w->port,
                    w->weight) != NULL &&
           step_add(op, STEP_CMD, ANS_EMPTY, w->name, "enable server %s/%s",
                    h->backend, w->name) != NULL;
    } else if (!same_addr(l->addr, w->host) || l->port != w->port) {
      ok = step_add(op, STEP_CMD, ANS_ADDR, w->name,
                    "set server %s/%s addr %s port %d", h->backend, w->name,
                    w->host, w->port) != NULL;
    }
  }
  return ok ? DC_OK : DC_ERROR;
}

/* Step 2: weights that go up first, then servers not ready are made ready,
 * then weights that go down, so traffic always has somewhere to go. A
 * server not ready takes no new traffic, so its weight is set early. */
static int plan_weights(const hap *h, apply_op *op, const hap_srv *live,
                        size_t nlive) {
  for (int pass = 0; pass < 3; pass++) {
    for (size_t i = 0; i < op->nwant; i++) {
      const router_server *w = &op->want[i];
      const hap_srv *l = find_live(live, nlive, w->name);
      if (l == NULL)
        continue;
      int not_ready = (l->admin & HAP_ADM_NOT_READY) != 0;
      int early = w->weight > l->weight || not_ready;
      int weight = w->weight != l->weight &&
                   (pass == 0 ? early : pass == 2 && !early);
      if (weight && step_add(op, STEP_CMD, ANS_EMPTY, w->name,
                             "set server %s/%s weight %d", h->backend,
                             w->name, w->weight) == NULL)
        return DC_ERROR;
      if (pass == 1 && not_ready &&
          step_add(op, STEP_CMD, ANS_EMPTY, w->name,
                   "set server %s/%s state ready", h->backend,
                   w->name) == NULL)
        return DC_ERROR;
    }
  }
  return DC_OK;
}

/* The commands that retire one server, stage by stage: weight 0 and drain
 * (stage 0), maint (stage 1), del (stage 2). A server already in
 * maintenance has no traffic and nothing to drain. */
static int plan_retire_one(const hap *h, apply_op *op, const hap_srv *l,
                           int stage) {
  const char *be = h->backend, *name = l->name;
  int maint = (l->admin & HAP_ADM_FMAINT) != 0;
  if (stage == 0 && !maint)
    return (l->weight == 0 ||
            step_add(op, STEP_CMD, ANS_EMPTY, name,
                     "set server %s/%s weight 0", be, name) != NULL) &&
           step_add(op, STEP_CMD, ANS_EMPTY, name,
                    "set server %s/%s state drain", be, name) != NULL;
  if (stage == 1)
    return step_add(op, STEP_CMD, ANS_EMPTY, name,
                    "set server %s/%s state maint", be, name) != NULL;
  if (stage == 2)
    return step_add(op, STEP_DEL, ANS_EMPTY, name, "del server %s/%s", be,
                    name) != NULL;
  return 1;
}

/* Step 3: ours that the list no longer names. All of them drain at once
 * (one wait for the lot), then each goes to maint and is deleted. */
static int plan_retire(const hap *h, apply_op *op, const hap_srv *live,
                       size_t nlive) {
  size_t nretire = 0;
  for (size_t i = 0; i < nlive; i++)
    nretire += !is_wanted(op, live[i].name);
  if (nretire == 0)
    return DC_OK;
  for (int stage = 0; stage < 3; stage++) {
    for (size_t i = 0; i < nlive; i++)
      if (!is_wanted(op, live[i].name) &&
          !plan_retire_one(h, op, &live[i], stage))
        return DC_ERROR;
    if (stage == 0 && step_add(op, STEP_DRAIN, ANS_EMPTY, "",
                               "show stat %s 4 -1", h->backend) == NULL)
      return DC_ERROR;
  }
  return DC_OK;
}


static void next_step(hap *h, apply_op *op);
static void apply_finish(hap *h, apply_op *op, const char *err);
static void apply_answered(hap *h, apply_op *op, const char *cmd, char *answer);

/* ---- apply: routes beyond weights ----------------------------------------
 *
 * deployctl owns one map file that haproxy.cfg loads (router.map; README,
 * "Routing beyond weights", has the lines) and keeps in it exactly what the
 * plan's routes need, replaced as a whole (prepare map, add, commit map:
 * HAProxy switches to the new version atomically):
 *   maintenance <page>, retry_after <s>     while in maintenance;
 *   <cookie> sticky                         the dynamic cookie of each fresh
 *                                           server, during a sticky canary;
 *   <server> <Set-Cookie value>             the cookie that server hands out;
 *   <value> test_route                      the testers' header or cookie
 *                                           value, while testers are routed.
 * Testers' requests go to the server `deployctl-test` of haproxy.cfg,
 * pointed at a fresh instance and made ready while testers are routed, in
 * maintenance otherwise. Sticky cookies are HAProxy's dynamic cookies
 * (`cookie NAME dynamic`): 2.6 takes no `cookie` on `add server`, and
 * computes a dynamic server's cookie only when asked (`enable
 * dynamic-cookie backend`), so it is asked after servers are added. */

static void map_clear(map_list *l) {
  for (size_t i = 0; i < l->n; i++) {
    free(l->v[i].key);
    free(l->v[i].value);
  }
  free(l->v);
  memset(l, 0, sizeof *l);
}

static int map_put(map_list *l, const char *key, const char *value) {
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 8;
    map_entry *v = realloc(l->v, cap * sizeof *v);
    if (v == NULL)
      return DC_ERROR;
    l->v = v;
    l->cap = cap;
  }
  char *k = strdup(key), *val = strdup(value);
  if (k == NULL || val == NULL) {
    free(k);
    free(val);
    return DC_ERROR;
  }
  l->v[l->n].key = k;
  l->v[l->n++].value = val;
  return DC_OK;
}

static int map_holds(const map_list *l, const map_entry *e) {
  for (size_t i = 0; i < l->n; i++)
    if (strcmp(l->v[i].key, e->key) == 0 && strcmp(l->v[i].value, e->value) == 0)
      return 1;
  return 0;
}

static int map_same(const map_list *a, const map_list *b) {
  if (a->n != b->n)
    return 0;
  for (size_t i = 0; i < a->n; i++)
    if (!map_holds(b, &a->v[i]))
      return 0;
  return 1;
}

/* "show map <file>": one "0xADDR key value" line per entry. */
static int parse_map(const hap *h, char *answer, map_list *out, char *err) {
  char *t = answer;
  if (strstr(t, "Unknown map identifier") != NULL) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: the HAProxy behind %s has no map '%s': router.map must name the map file that "
           "haproxy.cfg's lines for backend %s use, written as haproxy.cfg writes it (README, \"Routing "
           "beyond weights\")",
           h->socket, h->map, h->backend);
    return DC_ERROR;
  }
  while (*t != '\0') {
    char *line = cut(&t, '\n');
    if (*line == '\0')
      continue;
    char *rest = line;
    char *addr = cut(&rest, ' ');
    char *key = cut(&rest, ' ');
    if (strncmp(addr, "0x", 2) != 0 || *key == '\0') {
      char cmd[HAP_CMD_MAX];
      dc_fmt(cmd, sizeof cmd, "show map %s", h->map);
      msg_answered(h, cmd, line, err);
      return DC_ERROR;
    }
    if (map_put(out, key, rest) != DC_OK) {
      dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
      return DC_ERROR;
    }
  }
  return DC_OK;
}

static const router_server *first_fresh(const apply_op *op) {
  for (size_t i = 0; i < op->nwant; i++)
    if (op->want[i].fresh)
      return &op->want[i];
  return NULL;
}

/* The steps of the routes, and the map entries known before any cookie is
 * read. Goes between the weights and the retirements: routes to servers
 * that are about to leave are taken away before they leave. */
static int plan_routes(const hap *h, apply_op *op, char *err) {
  const route_rules *rt = &op->routes;
  const router_server *fresh = first_fresh(op);
  const char *be = h->backend;
  int testers = routes_test_active(rt) && fresh != NULL;
  if (h->map[0] == '\0')
    return DC_OK;
  if (testers && op->slot_admin < 0) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: backend %s has no server '%s' for testers' requests: add 'server %s 127.0.0.1:1 weight 0 "
           "disabled' and its use-server line to it (README, \"Routing beyond weights\")",
           be, HAP_TEST_SLOT, HAP_TEST_SLOT);
    return DC_ERROR;
  }
  int oom = 0;
  if (rt->maintenance) {
    char *page = routes_maintenance_page(rt->maintenance_message);
    char secs[24];
    dc_fmt(secs, sizeof secs, "%d", rt->retry_after);
    oom |= page == NULL || map_put(&op->map_want, "maintenance", page) != DC_OK ||
           map_put(&op->map_want, "retry_after", secs) != DC_OK;
    free(page);
  }
  if (routes_affinity_active(rt) && fresh != NULL)
    oom |= step_add(op, STEP_CMD, ANS_EMPTY, "", "enable dynamic-cookie backend %s", be) == NULL ||
           step_add(op, STEP_COOKIES, ANS_EMPTY, "", "show stat %s 6 -1", be) == NULL;
  if (testers) {
    oom |= map_put(&op->map_want, rt->test_value, HAP_ROLE_TEST) != DC_OK ||
           step_add(op, STEP_CMD, ANS_ADDR, "", "set server %s/%s addr %s port %d", be, HAP_TEST_SLOT, fresh->host,
                    fresh->port) == NULL ||
           step_add(op, STEP_CMD, ANS_EMPTY, "", "set server %s/%s state ready", be, HAP_TEST_SLOT) == NULL;
  }
  oom |= step_add(op, STEP_MAP, ANS_EMPTY, "", "commit map %s", h->map) == NULL;
  if (!testers && op->slot_admin >= 0 && !(op->slot_admin & HAP_ADM_FMAINT))
    oom |= step_add(op, STEP_CMD, ANS_EMPTY, "", "set server %s/%s state maint", be, HAP_TEST_SLOT) == NULL;
  if (oom) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
    return DC_ERROR;
  }
  return DC_OK;
}

static int is_fresh(const apply_op *op, const char *name) {
  for (size_t i = 0; i < op->nwant; i++)
    if (op->want[i].fresh && strcmp(op->want[i].name, name) == 0)
      return 1;
  return 0;
}

/* STEP_COOKIES: "show stat <backend> 6 -1" names the backend's cookie (its
 * BACKEND row) and each server's; each fresh server's goes into the map. */
static int cookies_from_stat(const hap *h, apply_op *op, char *answer, char *err) {
  const route_rules *rt = &op->routes;
  char *rest = answer, *f[HAP_MAX_COLS];
  char *hdr = cut(&rest, '\n');
  int n = starts_with(hdr, "# ") ? split_fields(hdr + 2, ',', f, HAP_MAX_COLS) : 0;
  int px = col_index(f, n, "pxname"), sv = col_index(f, n, "svname"), ck = col_index(f, n, "cookie");
  if (px < 0 || sv < 0 || ck < 0) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: 'show stat %s 6 -1' has no pxname, svname or cookie column", h->backend);
    return DC_ERROR;
  }
  int backend_seen = 0;
  while (*rest != '\0') {
    char *line = cut(&rest, '\n');
    n = split_fields(line, ',', f, HAP_MAX_COLS);
    if (n <= px || n <= sv || n <= ck || strcmp(f[px], h->backend) != 0)
      continue;
    if (strcmp(f[sv], "BACKEND") == 0) {
      backend_seen = 1;
      if (strcmp(f[ck], rt->affinity_cookie) != 0) {
        if (f[ck][0] == '\0')
          dc_fmt(err, DC_ERR_MAX,
                 "haproxy: backend %s has no cookie for sticky canaries: add 'cookie %s dynamic' and "
                 "'dynamic-cookie-key ...' to it (README, \"Routing beyond weights\")",
                 h->backend, rt->affinity_cookie);
        else
          dc_fmt(err, DC_ERR_MAX,
                 "haproxy: backend %s persists with cookie '%.63s', the strategy's session_affinity.cookie is "
                 "'%s': make them the same",
                 h->backend, f[ck], rt->affinity_cookie);
        return DC_ERROR;
      }
      continue;
    }
    if (!is_fresh(op, f[sv]))
      continue;
    if (f[ck][0] == '\0') {
      dc_fmt(err, DC_ERR_MAX,
             "haproxy: server %s/%s has no cookie: the backend's cookie line needs 'dynamic' and a "
             "'dynamic-cookie-key' (README, \"Routing beyond weights\")",
             h->backend, f[sv]);
      return DC_ERROR;
    }
    char value[256];
    dc_fmt(value, sizeof value, "%s=%s; Max-Age=%d; Path=/; HttpOnly", rt->affinity_cookie, f[ck],
           rt->affinity_max_age);
    if (map_put(&op->map_want, f[ck], HAP_ROLE_STICKY) != DC_OK || map_put(&op->map_want, f[sv], value) != DC_OK) {
      dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
      return DC_ERROR;
    }
  }
  if (!backend_seen) {
    msg_no_backend(h, err);
    return DC_ERROR;
  }
  return DC_OK;
}

static void on_cookies_answer(hap *h, void *vop, const char *err, char *answer) {
  apply_op *op = vop;
  if (err != NULL)
    apply_finish(h, op, err);
  else if (cookies_from_stat(h, op, answer, op->err) != DC_OK)
    apply_finish(h, op, op->err);
  else
    next_step(h, op);
}

/* "key value" lines for `add map ... <<`, ended by an empty line. */
static char *map_payload(const map_list *l) {
  dc_buf b = {0};
  for (size_t i = 0; i < l->n; i++)
    dc_buf_printf(&b, "%s %s\n", l->v[i].key, l->v[i].value);
  dc_buf_puts(&b, "\n");
  return dc_buf_take(&b);
}

static void run_map(hap *h, apply_op *op);

static void on_map_answer(hap *h, void *vop, const char *err, char *answer) {
  apply_op *op = vop;
  char cmd[HAP_CMD_MAX];
  if (err != NULL) {
    apply_finish(h, op, err);
    return;
  }
  char *t = trim(answer);
  if (op->map_phase == 0) {
    static const char created[] = "New version created: ";
    size_t d = starts_with(t, created) ? strspn(t + sizeof created - 1, "0123456789") : 0;
    if (d == 0 || d >= sizeof op->map_ver || t[sizeof created - 1 + d] != '\0') {
      dc_fmt(cmd, sizeof cmd, "prepare map %s", h->map);
      apply_answered(h, op, cmd, answer);
      return;
    }
    memcpy(op->map_ver, t + sizeof created - 1, d);
    op->map_ver[d] = '\0';
  } else if (*t != '\0') {
    dc_fmt(cmd, sizeof cmd, "%s map @%s %s", op->map_phase == 1 ? "add" : "commit", op->map_ver, h->map);
    apply_answered(h, op, cmd, answer);
    return;
  }
  op->map_phase++;
  run_map(h, op);
}

/* STEP_MAP: nothing when the map holds what it must already; else a new
 * version of it, filled, then committed. */
static void run_map(hap *h, apply_op *op) {
  char cmd[HAP_CMD_MAX];
  char *payload = NULL;
  int rc;
  if (op->map_phase == 0 && map_same(&op->map_now, &op->map_want)) {
    next_step(h, op);
    return;
  }
  switch (op->map_phase) {
  case 0:
    dc_fmt(cmd, sizeof cmd, "prepare map %s", h->map);
    break;
  case 1:
    if (op->map_want.n == 0) {  /* an empty version: nothing to add */
      op->map_phase++;
      run_map(h, op);
      return;
    }
    payload = map_payload(&op->map_want);
    if (payload == NULL) {
      apply_finish(h, op, "haproxy: out of memory");
      return;
    }
    dc_fmt(cmd, sizeof cmd, "add map @%s %s <<", op->map_ver, h->map);
    break;
  case 2:
    dc_fmt(cmd, sizeof cmd, "commit map @%s %s", op->map_ver, h->map);
    break;
  default:
    op->map_phase = 0;
    next_step(h, op);
    return;
  }
  rc = cmd_start_payload(h, op, cmd, payload, on_map_answer, op->err);
  if (rc < 0)
    apply_finish(h, op, op->err);
}

/* ---- apply: running the plan --------------------------------------------- */

static void run_step(hap *h, apply_op *op);
static void start_next(hap *h);
static void on_wait(uv_timer_t *t);

static void apply_op_free(apply_op *op) {
  free(op->want);
  free(op->steps);
  map_clear(&op->map_now);
  map_clear(&op->map_want);
  free(op);
}

/* The end of the running apply: cb once, then the next in the queue. */
static void apply_finish(hap *h, apply_op *op, const char *err) {
  h->running = NULL;
  uv_timer_stop(&h->wait);
  op->cb(op->payload, err);
  apply_op_free(op);
  if (!h->closing)
    start_next(h);
}

static void apply_answered(hap *h, apply_op *op, const char *cmd,
                           char *answer) {
  msg_answered(h, cmd, answer, op->err);
  apply_finish(h, op, op->err);
}

/* Pauses the running apply; on_wait then runs its current step again. */
static void apply_wait(hap *h, uint64_t ms) {
  uv_timer_start(&h->wait, on_wait, ms, 0);
}

static void next_step(hap *h, apply_op *op) {
  op->cur++;
  op->del_phase = 0;
  run_step(h, op);
}

static int addr_answer_ok(const char *answer) {
  /* "IP changed from 'a' to 'b', no need to change the port by 'stats
   * socket command'": every part must report a change or no change;
   * errors share the " by ..." suffix ("Invalid addr 'x' by ..."). */
  static const char by[] = " by 'stats socket command'";
  char buf[HAP_CMD_MAX];
  dc_strlcpy(buf, answer, sizeof buf);
  size_t n = strlen(buf);
  if (n < sizeof by - 1 || strcmp(buf + n - (sizeof by - 1), by) != 0)
    return 0;
  buf[n - (sizeof by - 1)] = '\0';
  for (char *rest = buf; *rest != '\0';) {
    char *part = trim(cut(&rest, ','));
    if (!starts_with(part, "IP changed from ") &&
        !starts_with(part, "port changed from ") &&
        strcmp(part, "no need to change the addr") != 0 &&
        strcmp(part, "no need to change the port") != 0)
      return 0;
  }
  return 1;
}

static int answer_ok(answer_kind kind, char *answer) {
  char *t = trim(answer);
  switch (kind) {
  case ANS_ADD: return strcmp(t, "New server registered.") == 0;
  case ANS_ADDR: return addr_answer_ok(t);
  default: return *t == '\0';
  }
}

static void on_step_answer(hap *h, void *vop, const char *err, char *answer) {
  apply_op *op = vop;
  hap_step *s = &op->steps[op->cur];
  if (err != NULL)
    apply_finish(h, op, err);
  else if (!answer_ok(s->answer, answer))
    apply_answered(h, op, s->text, answer);
  else
    next_step(h, op);
}

/* A server's current sessions (scur) added to a count, saturating: the
 * answer is HAProxy's text, and a number past LONG_MAX must not wrap. */
static long add_sessions(long busy, const char *scur) {
  char *end;
  long v = strtol(scur, &end, 10);
  if (end == scur || v <= 0)
    return busy;
  return v > LONG_MAX - busy ? LONG_MAX : busy + v;
}

/* Sessions still open on the servers being retired, from the CSV of
 * "show stat <backend> 4 -1"; -1 when the answer is not that CSV. */
static long busy_sessions(const hap *h, const apply_op *op, char *answer) {
  char *rest = answer;
  char *f[HAP_MAX_COLS];
  char *hdr = cut(&rest, '\n');
  if (!starts_with(hdr, "# "))
    return -1;
  int n = split_fields(hdr + 2, ',', f, HAP_MAX_COLS);
  int px = col_index(f, n, "pxname"), sv = col_index(f, n, "svname");
  int scur = col_index(f, n, "scur");
  if (px < 0 || sv < 0 || scur < 0)
    return -1;
  long busy = 0;
  while (*rest != '\0') {
    char *line = cut(&rest, '\n');
    n = split_fields(line, ',', f, HAP_MAX_COLS);
    if (n <= px || n <= sv || n <= scur || strcmp(f[px], h->backend) != 0)
      continue;
    for (size_t i = op->cur; i < op->nsteps; i++)
      if (op->steps[i].kind == STEP_DEL &&
          strcmp(op->steps[i].name, f[sv]) == 0)
        busy = add_sessions(busy, f[scur]);
  }
  return busy;
}

static void on_drain_answer(hap *h, void *vop, const char *err, char *answer) {
  apply_op *op = vop;
  if (err != NULL) {
    apply_finish(h, op, err);
    return;
  }
  long busy = busy_sessions(h, op, answer);
  if (busy < 0)
    apply_answered(h, op, op->steps[op->cur].text, answer);
  else if (busy == 0 || uv_now(h->e->loop) >= op->drain_deadline)
    next_step(h, op);   /* past the deadline, del's retries take over */
  else
    apply_wait(h, HAP_POLL_MS);
}

static void on_shutdown_answer(hap *h, void *vop, const char *err,
                               char *answer) {
  apply_op *op = vop;
  if (err != NULL) {
    apply_finish(h, op, err);
    return;
  }
  if (!answer_ok(ANS_EMPTY, answer)) {
    char cmd[HAP_CMD_MAX];
    dc_fmt(cmd, sizeof cmd, "shutdown sessions server %s/%s", h->backend,
           op->steps[op->cur].name);
    apply_answered(h, op, cmd, answer);
    return;
  }
  op->del_phase = 2;
  op->final_deadline = uv_now(h->e->loop) + HAP_FINAL_DEL_MS;
  run_step(h, op);
}

/* del server fails while connections are attached: retry until the drain
 * deadline, then cut the sessions and retry a little longer. */
static void on_del_answer(hap *h, void *vop, const char *err, char *answer) {
  apply_op *op = vop;
  hap_step *s = &op->steps[op->cur];
  uint64_t now = uv_now(h->e->loop);
  if (err != NULL) {
    apply_finish(h, op, err);
    return;
  }
  char *t = trim(answer);
  if (strcmp(t, "Server deleted.") == 0) {
    next_step(h, op);
  } else if (strstr(t, "still has connections attached") == NULL) {
    apply_answered(h, op, s->text, answer);
  } else if (op->del_phase == 0 && now < op->del_deadline) {
    apply_wait(h, HAP_POLL_MS);
  } else if (op->del_phase == 0) {
    op->del_phase = 1;
    run_step(h, op);
  } else if (now < op->final_deadline) {
    apply_wait(h, HAP_POLL_MS);
  } else {
    apply_answered(h, op, s->text, answer);
  }
}

static void run_del(hap *h, apply_op *op, hap_step *s) {
  char cmd[HAP_CMD_MAX];
  int rc;
  if (op->del_deadline == 0)   /* one deadline for all the dels */
    op->del_deadline = uv_now(h->e->loop) + h->drain_ms;
  if (op->del_phase == 1) {
    dc_fmt(cmd, sizeof cmd, "shutdown sessions server %s/%s", h->backend,
           s->name);
    rc = cmd_start(h, op, cmd, on_shutdown_answer, op->err);
  } else {
    rc = cmd_start(h, op, s->text, on_del_answer, op->err);
  }
  if (rc < 0)
    apply_finish(h, op, op->err);
}

static void run_step(hap *h, apply_op *op) {
  if (op->cur == op->nsteps) {
    apply_finish(h, op, NULL);
    return;
  }
  hap_step *s = &op->steps[op->cur];
  int rc = DC_OK;
  switch (s->kind) {
  case STEP_CMD:
    rc = cmd_start(h, op, s->text, on_step_answer, op->err);
    break;
  case STEP_DRAIN:
    if (op->drain_deadline == 0)
      op->drain_deadline = uv_now(h->e->loop) + h->drain_ms;
    rc = cmd_start(h, op, s->text, on_drain_answer, op->err);
    break;
  case STEP_DEL:
    run_del(h, op, s);
    return;
  case STEP_COOKIES:
    rc = cmd_start(h, op, s->text, on_cookies_answer, op->err);
    break;
  case STEP_MAP:
    run_map(h, op);
    return;
  }
  if (rc < 0)
    apply_finish(h, op, op->err);
}

static int plan(const hap *h, apply_op *op, const hap_srv *live,
                size_t nlive) {
  if (plan_add(h, op, live, nlive) < 0 ||
      plan_weights(h, op, live, nlive) < 0) {
    dc_fmt(op->err, DC_ERR_MAX, "haproxy: out of memory");
    return DC_ERROR;
  }
  if (plan_routes(h, op, op->err) < 0)
    return DC_ERROR;
  if (plan_retire(h, op, live, nlive) < 0) {
    dc_fmt(op->err, DC_ERR_MAX, "haproxy: out of memory");
    return DC_ERROR;
  }
  return DC_OK;
}

static void on_map_read(hap *h, void *vop, const char *err, char *answer) {
  apply_op *op = vop;
  if (err != NULL) {
    apply_finish(h, op, err);
    return;
  }
  if (parse_map(h, answer, &op->map_now, op->err) != DC_OK) {
    apply_finish(h, op, op->err);
    return;
  }
  op->planned = 1;
  run_step(h, op);
}

static void on_state_answer(hap *h, void *vop, const char *err,
                            char *answer) {
  apply_op *op = vop;
  hap_srv *live;
  size_t nlive;
  char cmd[HAP_CMD_MAX];
  if (err != NULL) {
    apply_finish(h, op, err);
    return;
  }
  dc_fmt(cmd, sizeof cmd, "show servers state %s", h->backend);
  if (parse_state(h, cmd, answer, &live, &nlive, &op->slot_admin, op->err) < 0) {
    apply_finish(h, op, op->err);
    return;
  }
  int rc = plan(h, op, live, nlive);
  free(live);
  if (rc < 0) {
    apply_finish(h, op, op->err);
    return;
  }
  if (h->map[0] == '\0') {
    op->planned = 1;
    run_step(h, op);
    return;
  }
  /* The map as it is, before the steps: STEP_MAP compares with it. */
  dc_fmt(cmd, sizeof cmd, "show map %s", h->map);
  if (cmd_start(h, op, cmd, on_map_read, op->err) < 0)
    apply_finish(h, op, op->err);
}

/* The running apply's timer: its first move, and every pause after. */
static void on_wait(uv_timer_t *t) {
  hap *h = t->data;
  apply_op *op = h->running;
  char cmd[HAP_CMD_MAX];
  if (op == NULL)
    return;
  if (op->planned) {
    run_step(h, op);
    return;
  }
  dc_fmt(cmd, sizeof cmd, "show servers state %s", h->backend);
  if (cmd_start(h, op, cmd, on_state_answer, op->err) < 0)
    apply_finish(h, op, op->err);
}

static void start_next(hap *h) {
  if (h->running != NULL || h->queue == NULL)
    return;
  h->running = h->queue;
  h->queue = h->queue->next;
  if (h->queue == NULL)
    h->queue_tail = NULL;
  /* Through the loop, so cb never runs inside apply. */
  uv_timer_start(&h->wait, on_wait, 0, 0);
}

/* ---- apply: validation and entry ----------------------------------------- */

static int check_server(const hap *h, const router_server *s, char *err) {
  if (!starts_with(s->name, h->prefix) || !valid_name(s->name)) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: server name '%s' must start with '%s' and use letters, "
           "digits, '_', '-', '.' (the router only touches its own servers)",
           s->name, h->prefix);
    return DC_ERROR;
  }
  if (addr_family(s->host) == 0) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: server %s: host '%s' is not an IP address (HAProxy's "
           "runtime API does not resolve names; give the instance's IP)",
           s->name, s->host);
    return DC_ERROR;
  }
  if (s->port < 1 || s->port > 65535 || s->weight < 0 || s->weight > 256) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: server %s: port %d or weight %d out of range (port "
           "1..65535, weight 0..256)",
           s->name, s->port, s->weight);
    return DC_ERROR;
  }
  return DC_OK;
}

static int check_servers(const hap *h, const router_server *servers, size_t n,
                         char *err) {
  for (size_t i = 0; i < n; i++) {
    if (check_server(h, &servers[i], err) < 0)
      return DC_ERROR;
    for (size_t j = 0; j < i; j++) {
      if (strcmp(servers[i].name, servers[j].name) == 0) {
        dc_fmt(err, DC_ERR_MAX,
               "haproxy: server %s is listed twice (names must be unique)",
               servers[i].name);
        return DC_ERROR;
      }
    }
  }
  return DC_OK;
}

static int hap_apply(router *r, const router_plan *plan, router_cb cb,
                     void *payload, char *err) {
  hap *h = (hap *)r;
  const router_server *servers = plan->servers;
  size_t n = plan->n;
  if (h->closing) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: router used after free");
    return DC_ERROR;
  }
  if (router_check_plan(r, plan, err) != DC_OK || check_servers(h, servers, n, err) < 0)
    return DC_ERROR;
  apply_op *op = calloc(1, sizeof *op);
  router_server *want = calloc(n ? n : 1, sizeof *want);
  if (op == NULL || want == NULL) {
    free(op);
    free(want);
    dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
    return DC_ERROR;
  }
  if (n > 0)
    memcpy(want, servers, n * sizeof *want);
  op->want = want;
  op->nwant = n;
  op->routes = plan->routes;
  op->cb = cb;
  op->payload = payload;
  if (h->queue_tail != NULL)
    h->queue_tail->next = op;
  else
    h->queue = op;
  h->queue_tail = op;
  start_next(h);
  return DC_OK;
}

/* ---- read ---------------------------------------------------------------- */

static void read_unlink(hap *h, read_op *op) {
  read_op **pp = &h->reads;
  while (*pp != NULL && *pp != op)
    pp = &(*pp)->next;
  if (*pp == op)
    *pp = op->next;
}

static void on_read_answer(hap *h, void *vop, const char *err, char *answer) {
  read_op *op = vop;
  char msg[DC_ERR_MAX], cmd[HAP_CMD_MAX];
  hap_srv *live = NULL;
  size_t nlive = 0;
  read_unlink(h, op);
  dc_fmt(cmd, sizeof cmd, "show servers state %s", h->backend);
  if (err == NULL && parse_state(h, cmd, answer, &live, &nlive, NULL, msg) < 0)
    err = msg;
  for (size_t i = 0; err == NULL && i < nlive && i < op->cap; i++) {
    router_server *o = &op->out[i];
    memset(o, 0, sizeof *o);
    dc_strlcpy(o->name, live[i].name, sizeof o->name);
    dc_strlcpy(o->host, live[i].addr, sizeof o->host);
    o->port = live[i].port;
    o->weight = live[i].weight;
    *op->n = i + 1;
  }
  free(live);
  op->cb(op->payload, err);
  free(op);
}

/* A read (servers or stats): one command, its answer parsed into the
 * caller's buffer by done; listed so that free can tell it. */
static int read_start(hap *h, const read_op *proto, const char *cmd, hap_done done, char *err) {
  *proto->n = 0;
  if (h->closing) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: router used after free");
    return DC_ERROR;
  }
  read_op *op = calloc(1, sizeof *op);
  if (op == NULL) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
    return DC_ERROR;
  }
  *op = *proto;
  if (cmd_start(h, op, cmd, done, err) < 0) {
    free(op);
    return DC_ERROR;
  }
  op->next = h->reads;
  h->reads = op;
  return DC_OK;
}

static int hap_read(router *r, router_server *out, size_t cap, size_t *n,
                    router_cb cb, void *payload, char *err) {
  hap *h = (hap *)r;
  char cmd[HAP_CMD_MAX];
  read_op op = {.cb = cb, .payload = payload, .out = out, .cap = cap, .n = n};
  dc_fmt(cmd, sizeof cmd, "show servers state %s", h->backend);
  return read_start(h, &op, cmd, on_read_answer, err);
}

/* ---- stats --------------------------------------------------------------- */

/* Counter columns of "show stat" read for analysis, in router_stat order. */
static const char *const stat_cols[] = {"hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx",
                                        "hrsp_other", "eresp", "econ", "rtime"};
#define NSTAT_COLS (sizeof stat_cols / sizeof *stat_cols)

/* Our servers' rows of the CSV of "show stat <backend> 4 -1". An empty
 * field (a counter HAProxy does not keep for that row) reads as 0. */
static int parse_stats(const hap *h, const char *cmd, char *answer, read_op *op, char *err) {
  char *rest = answer;
  char *f[HAP_MAX_COLS];
  char *hdr = cut(&rest, '\n');
  int col[NSTAT_COLS];
  if (!starts_with(hdr, "# ")) {
    msg_answered(h, cmd, hdr, err);
    return DC_ERROR;
  }
  int n = split_fields(hdr + 2, ',', f, HAP_MAX_COLS);
  int px = col_index(f, n, "pxname"), sv = col_index(f, n, "svname");
  for (size_t i = 0; i < NSTAT_COLS; i++) {
    col[i] = col_index(f, n, stat_cols[i]);
    if (col[i] < 0 || px < 0 || sv < 0) {
      dc_fmt(err, DC_ERR_MAX, "haproxy: '%s' has no column %s (HAProxy 2.6 or later, backend in mode http, needed)",
             cmd, col[i] < 0 ? stat_cols[i] : "pxname/svname");
      return DC_ERROR;
    }
  }
  *op->n = 0;
  while (*rest != '\0' && *op->n < op->cap) {
    char *line = cut(&rest, '\n');
    n = split_fields(line, ',', f, HAP_MAX_COLS);
    if (n <= px || n <= sv || strcmp(f[px], h->backend) != 0 || !starts_with(f[sv], h->prefix))
      continue;
    router_stat *st = &op->stats[(*op->n)++];
    memset(st, 0, sizeof *st);
    dc_strlcpy(st->name, f[sv], sizeof st->name);
    double *v[NSTAT_COLS] = {&st->hrsp[0], &st->hrsp[1], &st->hrsp[2], &st->hrsp[3], &st->hrsp[4],
                             &st->hrsp[5], &st->eresp, &st->econ, &st->rtime};
    for (size_t i = 0; i < NSTAT_COLS; i++)
      *v[i] = col[i] < n ? strtod(f[col[i]], NULL) : 0;
  }
  return DC_OK;
}

static void on_stats_answer(hap *h, void *vop, const char *err, char *answer) {
  read_op *op = vop;
  char msg[DC_ERR_MAX], cmd[HAP_CMD_MAX];
  read_unlink(h, op);
  dc_fmt(cmd, sizeof cmd, "show stat %s 4 -1", h->backend);
  if (err == NULL && parse_stats(h, cmd, answer, op, msg) < 0)
    err = msg;
  op->cb(op->payload, err);
  free(op);
}

static int hap_stats(router *r, router_stat *out, size_t cap, size_t *n, router_cb cb, void *payload,
                     char *err) {
  hap *h = (hap *)r;
  char cmd[HAP_CMD_MAX];
  read_op op = {.cb = cb, .payload = payload, .stats = out, .cap = cap, .n = n};
  dc_fmt(cmd, sizeof cmd, "show stat %s 4 -1", h->backend);
  return read_start(h, &op, cmd, on_stats_answer, err);
}

/* ---- life cycle ---------------------------------------------------------- */

static void wait_closed(uv_handle_t *handle) {
  hap *h = handle->data;
  h->open_handles--;
  hap_release(h);
}

static const char hap_closed_msg[] = "haproxy: router closed";

/* Every operation still pending is told "router closed" before free
 * returns; commands in flight are dropped; the memory goes once the loop
 * has closed every handle. */
static void hap_free(router *r) {
  hap *h = (hap *)r;
  if (h == NULL || h->closing)
    return;
  h->closing = 1;
  if (h->fwd_op != NULL)
    ssh_cancel(h->fwd_op);  /* its callback releases h */
  while (h->cmds != NULL) {
    hap_cmd *c = h->cmds;
    c->op = NULL;
    cmd_close(c);
  }
  uv_close((uv_handle_t *)&h->wait, wait_closed);
  apply_op *ops = h->running;
  if (ops != NULL)
    ops->next = h->queue;
  else
    ops = h->queue;
  h->running = h->queue = h->queue_tail = NULL;
  read_op *reads = h->reads;
  h->reads = NULL;
  while (ops != NULL) {
    apply_op *op = ops;
    ops = op->next;
    op->cb(op->payload, hap_closed_msg);
    apply_op_free(op);
  }
  while (reads != NULL) {
    read_op *op = reads;
    reads = op->next;
    op->cb(op->payload, hap_closed_msg);
    free(op);
  }
}

/* tcp://ADDR:PORT, with ADDR an IPv4 address or [IPv6]. */
static int parse_tcp(hap *h, const char *spec, char *err) {
  const char *fix = "write tcp://ADDR:PORT with the address of HAProxy's 'stats socket ipv4@ADDR:PORT', "
                    "e.g. tcp://10.0.0.1:9999 (tcp://[fd00::1]:9999 for IPv6)";
  char host[64];
  const char *colon;
  if (spec[0] == '[') {
    const char *close = strchr(spec, ']');
    if (close == NULL || close[1] != ':' || (size_t)(close - spec - 1) >= sizeof host) {
      dc_fmt(err, DC_ERR_MAX, "haproxy: socket 'tcp://%s' is not an address and port: %s", spec, fix);
      return DC_ERROR;
    }
    memcpy(host, spec + 1, (size_t)(close - spec - 1));
    host[close - spec - 1] = '\0';
    colon = close + 1;
  } else {
    colon = strrchr(spec, ':');
    if (colon == NULL || (size_t)(colon - spec) >= sizeof host) {
      dc_fmt(err, DC_ERR_MAX, "haproxy: socket 'tcp://%s' is not an address and port: %s", spec, fix);
      return DC_ERROR;
    }
    memcpy(host, spec, (size_t)(colon - spec));
    host[colon - spec] = '\0';
  }
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (colon[1] == '\0' || *end != '\0' || port < 1 || port > 65535) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: socket 'tcp://%s' has no valid port (1-65535): %s", spec, fix);
    return DC_ERROR;
  }
  if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&h->addr) != 0 &&
      uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)&h->addr) != 0) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: socket 'tcp://%s': '%s' is not an IP address (a name is not resolved "
           "here): %s", spec, host, fix);
    return DC_ERROR;
  }
  return DC_OK;
}

/* ssh://DEST/path/of/socket */
static int parse_ssh(hap *h, const router_haproxy_opts *o, const char *spec, char *err) {
  const char *slash = strchr(spec, '/');
  if (slash == NULL || slash == spec || (size_t)(slash - spec) >= sizeof h->dest || slash[1] == '\0') {
    dc_fmt(err, DC_ERR_MAX, "haproxy: socket 'ssh://%s' names no host and socket path: write "
           "ssh://HOST/path/of/admin.sock, e.g. ssh://lb1/run/haproxy/admin.sock", spec);
    return DC_ERROR;
  }
  memcpy(h->dest, spec, (size_t)(slash - spec));
  h->dest[slash - spec] = '\0';
  char why[DC_ERR_MAX];
  if (ssh_validate_dest(h->dest, why) != 0) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: socket 'ssh://%s': %s", spec, dc_unprefix(why));
    return DC_ERROR;
  }
  if (strlen(slash) >= sizeof h->path || strpbrk(slash, ": \t\"'\\") != NULL) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: socket 'ssh://%s': the socket path on the host must be at most %zu bytes, "
           "without ':', quotes or whitespace", spec, sizeof h->path - 1);
    return DC_ERROR;
  }
  dc_strlcpy(h->path, slash, sizeof h->path);
  if (o->ssh == NULL) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: socket 'ssh://%s' needs ssh connections: none were given", spec);
    return DC_ERROR;
  }
  h->ssh = o->ssh;
  h->transport = HAP_SSH;
  return DC_OK;
}

static int hap_parse_socket(hap *h, const router_haproxy_opts *o, char *err) {
  const char *s = o->socket;
  if (strncmp(s, "tcp://", 6) == 0) {
    h->transport = HAP_TCP;
    return parse_tcp(h, s + 6, err);
  }
  if (strncmp(s, "ssh://", 6) == 0)
    return parse_ssh(h, o, s + 6, err);
  if (strstr(s, "://") != NULL) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: socket '%s' is of a kind not known: give a path, tcp://ADDR:PORT or "
           "ssh://HOST/path", s);
    return DC_ERROR;
  }
  if (strlen(s) >= sizeof h->path) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: stats socket path '%s' is too long for a unix socket "
           "(at most %zu bytes; use a shorter path)",
           s, sizeof h->path - 1);
    return DC_ERROR;
  }
  h->transport = HAP_UNIX;
  dc_strlcpy(h->path, s, sizeof h->path);
  return DC_OK;
}

static int hap_check_opts(const router_haproxy_opts *o, char *err) {
  if (o == NULL || o->socket == NULL || o->socket[0] == '\0') {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: no stats socket given (set the path of a 'stats socket "
           "<path> level admin' from haproxy.cfg, tcp://ADDR:PORT or ssh://HOST/path)");
    return DC_ERROR;
  }
  if (strlen(o->socket) >= 512) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: socket '%.64s...' is longer than 511 bytes", o->socket);
    return DC_ERROR;
  }
  if (o->backend == NULL || strlen(o->backend) >= 128 ||
      !valid_name(o->backend)) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: backend name '%s' is not valid (a backend of haproxy.cfg "
           "with 'balance roundrobin': letters, digits, '_', '-', '.', ':')",
           o->backend ? o->backend : "");
    return DC_ERROR;
  }
  if (o->map != NULL && o->map[0] != '\0' &&
      (strlen(o->map) >= 512 || strpbrk(o->map, " \t\r\n;#\\") != NULL)) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: router.map '%.80s' is not a usable map file name (at most 511 bytes, no spaces, ';', '#' "
           "or '\\'): give the path haproxy.cfg's map() uses",
           o->map);
    return DC_ERROR;
  }
  if (o->prefix != NULL &&
      (strlen(o->prefix) >= 32 || !valid_name(o->prefix))) {
    dc_fmt(err, DC_ERR_MAX,
           "haproxy: server prefix '%s' is not valid (up to 31 letters, "
           "digits, '_', '-', '.'; default \"dc_\")",
           o->prefix);
    return DC_ERROR;
  }
  return DC_OK;
}

static uint64_t seconds_ms(double s, double dflt) {
  return (uint64_t)((s > 0 ? s : dflt) * 1000.0 + 0.5);
}

int router_haproxy_new(router **out, engine *e, const router_haproxy_opts *o,
                       char *err) {
  *out = NULL;
  if (hap_check_opts(o, err) < 0)
    return DC_ERROR;
  hap *h = calloc(1, sizeof *h);
  if (h == NULL) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
    return DC_ERROR;
  }
  h->e = e;
  dc_strlcpy(h->socket, o->socket, sizeof h->socket);
  if (hap_parse_socket(h, o, err) < 0) {
    free(h);
    return DC_ERROR;
  }
  dc_strlcpy(h->backend, o->backend, sizeof h->backend);
  dc_strlcpy(h->prefix, o->prefix ? o->prefix : "dc_", sizeof h->prefix);
  dc_strlcpy(h->map, o->map ? o->map : "", sizeof h->map);
  dc_fmt(h->label, sizeof h->label, "haproxy %s (backend %s)", h->socket, h->backend);
  h->timeout_ms = seconds_ms(o->timeout, 5);
  h->drain_ms = seconds_ms(o->drain_timeout, 30);
  uv_timer_init(e->loop, &h->wait);
  h->wait.data = h;
  h->open_handles = 1;
  h->base.version = ROUTER_VERSION;
  h->base.kind = "haproxy";
  h->base.label = h->label;
  h->base.can_route = h->map[0] != '\0';
  h->base.apply = hap_apply;
  h->base.read = hap_read;
  h->base.free = hap_free;
  h->base.stats = hap_stats;
  *out = &h->base;
  return DC_OK;
}

/* ---- fuzzing ------------------------------------------------------------- */

#ifdef DEPLOY_FUZZ
/* An entry point here rather than the parsers split into a file of their
 * own: they stay static and where they are, the normal build compiles the
 * same code as before, and what the fuzzer runs is what the router runs.
 * No loop is involved: none of these readers touches a handle. */
int haproxy_fuzz_answers(const char *backend, const char *prefix, const router_server *want, size_t nwant,
                         char *state, char *stat, char *answer, haproxy_fuzz_step_cb step, void *payload,
                         haproxy_fuzz_result *out, char *err) {
  hap h;
  apply_op op;
  hap_srv *live = NULL;
  size_t nlive = 0;
  char cmd[HAP_CMD_MAX];
  memset(out, 0, sizeof *out);
  memset(&h, 0, sizeof h);
  dc_strlcpy(h.socket, "/run/haproxy/admin.sock", sizeof h.socket);
  dc_strlcpy(h.backend, backend, sizeof h.backend);
  dc_strlcpy(h.prefix, prefix, sizeof h.prefix);
  dc_fmt(cmd, sizeof cmd, "show servers state %s", h.backend);
  /* The servers wanted are checked as apply checks them, before any answer. */
  memset(&op, 0, sizeof op);
  if (check_servers(&h, want, nwant, err) < 0 || parse_state(&h, cmd, state, &live, &nlive, &op.slot_admin, err) < 0)
    return DC_ERROR;
  op.want = (router_server *)want;
  op.nwant = nwant;   /* no routes and no map: weights only */
  int rc = plan(&h, &op, live, nlive);
  free(live);
  if (rc < 0) {
    free(op.steps);
    dc_strlcpy(err, op.err, DC_ERR_MAX);
    return DC_ERROR;
  }
  out->nlive = nlive;
  out->nsteps = op.nsteps;
  out->busy = -2;
  /* The same answer as the analysis source reads it (before the drain's
   * reader cuts it up). */
  char *stat_copy = strdup(stat);
  if (stat_copy == NULL) {
    free(op.steps);
    dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
    return DC_ERROR;
  }
  char stat_err[DC_ERR_MAX];
  read_op sop = {.stats = out->stats, .cap = sizeof out->stats / sizeof *out->stats, .n = &out->nstats};
  dc_fmt(cmd, sizeof cmd, "show stat %s 4 -1", h.backend);
  out->stats_rc = parse_stats(&h, cmd, stat_copy, &sop, stat_err);
  free(stat_copy);
  dc_fmt(cmd, sizeof cmd, "show servers state %s", h.backend);
  for (size_t i = 0; i < op.nsteps; i++) {
    step(payload, op.steps[i].name, op.steps[i].text);
    if (op.steps[i].kind == STEP_DRAIN && out->busy == -2) {
      op.cur = i;
      out->busy = busy_sessions(&h, &op, stat);
    }
  }
  free(op.steps);
  size_t len = strlen(answer);
  char *copy = malloc(len + 1);
  if (copy == NULL) {
    dc_fmt(err, DC_ERR_MAX, "haproxy: out of memory");
    return DC_ERROR;
  }
  const answer_kind kinds[] = {ANS_EMPTY, ANS_ADD, ANS_ADDR};
  int *oks[] = {&out->ok_empty, &out->ok_add, &out->ok_addr};
  for (size_t k = 0; k < 3; k++) {
    memcpy(copy, answer, len + 1);
    *oks[k] = answer_ok(kinds[k], copy);
  }
  msg_answered(&h, cmd, answer, err);
  free(copy);
  return DC_OK;
}
#endif
