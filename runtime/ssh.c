/* Remote commands through the system's OpenSSH client: see ssh.h for the
 * model (one shared master connection per destination, strict host keys,
 * batch mode).
 *
 * Life of a command (an op): ssh_run queues it on its destination's host
 * record and starts its timer; host_pump spawns it once the master is up
 * and a session slot is free. It ends once, in op_finish (exit seen and
 * both pipes at EOF, or timeout, cancel, spawn failure, oversize output):
 * the child is killed if still running, every handle is closed, and the
 * callback runs from the last close callback, so never inside a call of
 * this module, and always after the local ssh has exited.
 *
 * A master is an op too (kind OP_MASTER, no callback): `ssh -N` with
 * ControlPersist forks into the background once authenticated and its
 * foreground process exits 0, which is our "connected"; exit 255 fails
 * every command queued for that host with the classified reason.
 *
 * Why ssh's messages are matched as text: exit 255 plus stderr is all the
 * OpenSSH client tells its caller. The matching is confined to classify();
 * everything after it goes by ssh_status. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* explicit_bzero, mkdtemp */
#endif

#include "ssh.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "util.h"

#define SSH_DEFAULT_BIN "/usr/bin/ssh"
#define DEFAULT_CONNECT_TIMEOUT 10.0
#define DEFAULT_PERSIST 600.0
#define DEFAULT_MAX_SESSIONS 8
#define READ_CHUNK 65536
#define DRAIN_MS 1000      /* after ssh exits, how long its pipes may lag */
#define MASTER_SLACK_S 5.0 /* master deadline: 2 x ConnectTimeout + this */
#define ALIVE_INTERVAL 10  /* ServerAliveInterval of masters: a dead link */
#define ALIVE_COUNT 3      /* ends the master after 30 s */
#define SSH_TMP_SUFFIX 17  /* ssh binds ControlPath + ".XXXXXXXXXXXXXXXX" first */
#define DETAIL_MAX 240
#define REDACTED "<ssh key>"
#define KEY_PEM_PREFIX "-----BEGIN"

typedef enum { OP_COMMAND, OP_MASTER, OP_EXIT } op_kind;
typedef enum { HOST_IDLE, HOST_CONNECTING, HOST_READY } host_state;

typedef struct buf {
  char *p;
  size_t len, cap;
} buf;

typedef struct ssh_host ssh_host;

struct ssh_op {
  ssh_op *prev, *next;   /* every live op of the context */
  ssh_op *qnext;         /* the host's queue */
  ssh_ctx *c;
  ssh_host *h;
  op_kind kind;
  ssh_cb cb;
  void *payload;
  ssh_output_cb on_output;
  char *command;
  char *forward;         /* ssh_forward: "LOCAL:REMOTE" for -O forward -L, instead of a command */
  char *input;           /* wiped once written, or when freed */
  size_t input_len;
  double timeout;
  uint64_t t0;           /* uv_hrtime at ssh_run */
  int queued, spawned, running, exited, out_eof, err_eof, finishing;
  int has_stdin;
  int open;              /* handles not yet closed */
  int64_t exit_status;
  int term_signal;
  uv_timer_t timer;      /* the timeout, then the drain after exit */
  uv_process_t proc;
  uv_pipe_t pin, pout, perr;
  uv_write_t wr;
  uv_shutdown_t sd;
  buf out, errb;
  ssh_status status;
  char err[DC_ERR_MAX];
};

struct ssh_host {
  ssh_host *next;
  ssh_ctx *c;
  char *dest;            /* as the caller wrote it */
  char *target;          /* [user@]host as ssh gets it */
  char port[8];          /* "" or the port for -p */
  char control_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  host_state state;
  int connections;       /* handshakes started */
  int running;           /* commands spawned and not finished */
  ssh_op *qhead, *qtail; /* commands waiting for the master or a slot */
};

struct ssh_ctx {
  engine *e;
  char *ssh_path, *key, *key_source, *known_hosts, *config_file;
  int key_is_ours;       /* the key came as text: we wrote the file */
  int accept_new, no_sharing, max_sessions;
  double connect_timeout, persist;
  char dir[SSH_CONTROL_DIR_MAX + 1];
  int dir_is_ours;
  int nhosts;
  int nforwards;         /* local sockets made by ssh_forward: <dir>/f1, f2, ... */
  ssh_host *hosts;
  ssh_op ops;            /* list sentinel */
  int closing;
  char scratch[READ_CHUNK];  /* every read lands here first */
};

/* ---- small helpers ---------------------------------------------------- */

const char *ssh_status_name(ssh_status s) {
  switch (s) {
  case SSH_OK: return "ok";
  case SSH_ESPAWN: return "spawn";
  case SSH_EHOSTKEY_CHANGED: return "hostkey-changed";
  case SSH_EHOSTKEY_UNKNOWN: return "hostkey-unknown";
  case SSH_EUNREACHABLE: return "unreachable";
  case SSH_EAUTH: return "auth";
  case SSH_ETIMEOUT: return "timeout";
  case SSH_ETOOBIG: return "too-big";
  case SSH_ECONNLOST: return "connection-lost";
  case SSH_ETRANSPORT: return "transport";
  case SSH_ECANCELLED: return "cancelled";
  }
  return "unknown";
}

static void wipe_free(char *p, size_t n) {
  if (!p)
    return;
  explicit_bzero(p, n);
  free(p);
}

/* Appends; the buffer stays NUL-terminated. -1 when it would pass max. */
static int buf_add(buf *b, const char *data, size_t n, size_t max) {
  if (b->len + n > max)
    return -1;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + n + 1)
      cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
      return -1;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, data, n);
  b->len += n;
  b->p[b->len] = '\0';
  return 0;
}

static int buf_adds(buf *b, const char *s) {
  return buf_add(b, s, strlen(s), (size_t)-1 / 2);
}

char *ssh_shell_quote(const char *s) {
  buf b = {0};
  int r = buf_adds(&b, "'");
  for (const char *p = s; r == 0 && *p; p++)
    r = *p == '\'' ? buf_adds(&b, "'\\''") : buf_add(&b, p, 1, (size_t)-1 / 2);
  if (r == 0)
    r = buf_adds(&b, "'");
  if (r != 0) {
    free(b.p);
    return NULL;
  }
  return b.p;
}

/* A copy of s fit to quote in a message: control characters become '?',
 * cut at max bytes. */
static void printable(char *dst, size_t size, const char *s, size_t max) {
  size_t n = 0;
  for (; s && *s && n + 1 < size && n < max; s++)
    dst[n++] = ((unsigned char)*s < 0x20 || *s == 0x7f) ? '?' : *s;
  dst[n] = '\0';
}

/* argv under construction; every entry is owned. */
typedef struct strv {
  char **v;
  size_t n, cap;
  int failed;
} strv;

static void sv_add(strv *s, const char *a) {
  if (s->failed)
    return;
  if (s->n + 2 > s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 32;
    char **v = realloc(s->v, cap * sizeof *v);
    if (!v) {
      s->failed = 1;
      return;
    }
    s->v = v;
    s->cap = cap;
  }
  s->v[s->n] = strdup(a);
  if (!s->v[s->n]) {
    s->failed = 1;
    return;
  }
  s->v[++s->n] = NULL;
}

static void sv_opt(strv *s, const char *option) {
  sv_add(s, "-o");
  sv_add(s, option);
}

static void sv_free(strv *s) {
  for (size_t i = 0; i < s->n; i++)
    free(s->v[i]);
  free(s->v);
}

/* ---- destinations ----------------------------------------------------- */

static int is_host_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
}

static int valid_port(const char *s, size_t n) {
  if (n == 0 || n > 5)
    return 0;
  long v = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9')
      return 0;
    v = v * 10 + (s[i] - '0');
  }
  return v >= 1 && v <= 65535;
}

static int valid_v6(const char *s, size_t n) {
  if (n == 0 || n > 45)
    return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    int ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
             (c >= 'A' && c <= 'F') || c == ':' || c == '.';
    if (!ok)
      return 0;
  }
  return 1;
}

/* Splits dest into the [user@]host ssh gets and the port for -p. Error
 * messages quote the destination with control characters masked. */
static int parse_dest(const char *dest, char *target, size_t tsize, char *port,
                      char *err) {
  char shown[80];
  printable(shown, sizeof shown, dest, 64);
  const char *fix = "give [user@]host[:port], [user@][ipv6]:port or a Host alias of the ssh config";
  if (!dest || !*dest) {
    dc_fmt(err, DC_ERR_MAX, "ssh: empty destination: %s", fix);
    return -1;
  }
  size_t len = strlen(dest);
  if (len > SSH_DEST_MAX) {
    dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s...' is longer than %d bytes: %s",
           shown, SSH_DEST_MAX, fix);
    return -1;
  }
  if (dest[0] == '-') {
    dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s' starts with '-', which ssh would take as an option: %s",
           shown, fix);
    return -1;
  }
  for (const char *p = dest; *p; p++) {
    unsigned char ch = (unsigned char)*p;
    if (ch <= ' ' || ch == 0x7f) {
      dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s' holds whitespace or a control character: %s",
             shown, fix);
      return -1;
    }
  }
  const char *at = strrchr(dest, '@');
  const char *host = at ? at + 1 : dest;
  size_t ulen = at ? (size_t)(at - dest) : 0;
  for (size_t i = 0; i < ulen; i++) {
    if (!is_host_char(dest[i]) || (i == 0 && dest[i] == '-')) {
      dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s': the user name may hold letters, digits, '.', '_' and '-' (not first): %s",
             shown, fix);
      return -1;
    }
  }
  if (at && ulen == 0) {
    dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s' has an empty user name: %s", shown, fix);
    return -1;
  }
  const char *h = host, *pt = NULL;
  size_t hlen = 0, plen = 0;
  const char *colon = strchr(host, ':');
  if (host[0] == '[') {
    const char *close = strchr(host, ']');
    if (!close || !valid_v6(host + 1, (size_t)(close - host - 1)) ||
        (close[1] != '\0' && close[1] != ':')) {
      dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s': brackets must hold an IPv6 address, then optionally ':port': %s",
             shown, fix);
      return -1;
    }
    h = host + 1;
    hlen = (size_t)(close - host - 1);
    if (close[1] == ':') {
      pt = close + 2;
      plen = strlen(pt);
    }
  } else if (colon && strchr(colon + 1, ':')) {
    /* Two or more colons: a bare IPv6 address, no port. */
    h = host;
    hlen = strlen(host);
    if (!valid_v6(h, hlen)) {
      dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s' is not a valid IPv6 address: %s", shown, fix);
      return -1;
    }
  } else {
    h = host;
    hlen = colon ? (size_t)(colon - host) : strlen(host);
    if (colon) {
      pt = colon + 1;
      plen = strlen(pt);
    }
    for (size_t i = 0; i < hlen; i++) {
      if (!is_host_char(h[i])) {
        dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s': a host name may hold letters, digits, '.', '_' and '-': %s",
               shown, fix);
        return -1;
      }
    }
  }
  if (hlen == 0 || h[0] == '-') {
    dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s' has an empty host, or one starting with '-': %s",
           shown, fix);
    return -1;
  }
  if (pt && !valid_port(pt, plen)) {
    dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s': the port must be 1-65535: %s", shown, fix);
    return -1;
  }
  if (ulen + 1 + hlen + 1 > tsize) {
    dc_fmt(err, DC_ERR_MAX, "ssh: destination '%s' is too long: %s", shown, fix);
    return -1;
  }
  size_t n = 0;
  if (at) {
    memcpy(target, dest, ulen + 1);
    n = ulen + 1;
  }
  memcpy(target + n, h, hlen);
  target[n + hlen] = '\0';
  port[0] = '\0';
  if (pt) {
    memcpy(port, pt, plen);
    port[plen] = '\0';
  }
  return 0;
}

int ssh_validate_dest(const char *dest, char *err) {
  char target[SSH_DEST_MAX + 1], port[8];
  return parse_dest(dest, target, sizeof target, port, err);
}

/* ---- the context's list of ops, and its end --------------------------- */

static void ctx_destroy(ssh_ctx *c) {
  ssh_host *h = c->hosts;
  while (h) {
    ssh_host *next = h->next;
    unlink(h->control_path);  /* only there when a master did not exit */
    free(h->dest);
    free(h->target);
    free(h);
    h = next;
  }
  if (c->key_is_ours && c->key)
    unlink(c->key);
  for (int i = 1; i <= c->nforwards; i++) {
    char path[SSH_CONTROL_DIR_MAX + 16];
    dc_fmt(path, sizeof path, "%s/f%d", c->dir, i);
    unlink(path);  /* a master that exited may leave its listener behind */
  }
  if (c->dir_is_ours)
    rmdir(c->dir);
  free(c->ssh_path);
  free(c->key);
  free(c->key_source);
  free(c->known_hosts);
  free(c->config_file);
  free(c);
}

static void ops_link(ssh_ctx *c, ssh_op *op) {
  op->next = &c->ops;
  op->prev = c->ops.prev;
  c->ops.prev->next = op;
  c->ops.prev = op;
}

static void op_free(ssh_op *op) {
  ssh_ctx *c = op->c;
  op->prev->next = op->next;
  op->next->prev = op->prev;
  wipe_free(op->input, op->input_len);
  free(op->command);
  free(op->forward);
  free(op->out.p);
  free(op->errb.p);
  free(op);
  if (c->closing && c->ops.next == &c->ops)
    ctx_destroy(c);
}

/* ---- hosts ------------------------------------------------------------ */

static ssh_host *host_get(ssh_ctx *c, const char *dest, char *err) {
  for (ssh_host *h = c->hosts; h; h = h->next) {
    if (strcmp(h->dest, dest) == 0)
      return h;
  }
  char target[SSH_DEST_MAX + 1], port[8];
  if (parse_dest(dest, target, sizeof target, port, err) != 0)
    return NULL;
  ssh_host *h = calloc(1, sizeof *h);
  if (h) {
    h->dest = strdup(dest);
    h->target = strdup(target);
  }
  if (!h || !h->dest || !h->target) {
    if (h) {
      free(h->dest);
      free(h->target);
    }
    free(h);
    dc_fmt(err, DC_ERR_MAX, "ssh: out of memory");
    return NULL;
  }
  h->c = c;
  dc_strlcpy(h->port, port, sizeof h->port);
  /* One socket per destination we were given: two aliases of one machine
   * get a master each, so the count stays honest. */
  dc_fmt(h->control_path, sizeof h->control_path, "%s/%d", c->dir, ++c->nhosts);
  h->next = c->hosts;
  c->hosts = h;
  return h;
}

static void queue_push(ssh_host *h, ssh_op *op) {
  op->qnext = NULL;
  if (h->qtail)
    h->qtail->qnext = op;
  else
    h->qhead = op;
  h->qtail = op;
  op->queued = 1;
}

static ssh_op *queue_pop(ssh_host *h) {
  ssh_op *op = h->qhead;
  if (!op)
    return NULL;
  h->qhead = op->qnext;
  if (!h->qhead)
    h->qtail = NULL;
  op->queued = 0;
  op->qnext = NULL;
  return op;
}

static void queue_remove(ssh_host *h, ssh_op *op) {
  ssh_op **pp = &h->qhead, *prev = NULL;
  while (*pp && *pp != op) {
    prev = *pp;
    pp = &(*pp)->qnext;
  }
  if (*pp) {
    *pp = op->qnext;
    if (h->qtail == op)
      h->qtail = prev;
  }
  op->queued = 0;
  op->qnext = NULL;
}

/* 1 while a master listens on the socket. A stale file (a master killed
 * with SIGKILL) refuses the connection. */
static int control_alive(const char *path) {
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (strlen(path) >= sizeof sa.sun_path)
    return 0;
  memcpy(sa.sun_path, path, strlen(path) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0)
    return 0;
  int r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  int alive = r == 0 || errno == EAGAIN;
  close(fd);
  return alive;
}

/* ---- classification of ssh's failures --------------------------------- */

typedef struct pattern {
  const char *text;
  ssh_status status;
} pattern;

/* In order: the first match wins (a changed key also prints "Host key
 * verification failed"). */
static const pattern PATTERNS[] = {
    {"REMOTE HOST IDENTIFICATION HAS CHANGED", SSH_EHOSTKEY_CHANGED},
    {"has changed and you have requested strict checking", SSH_EHOSTKEY_CHANGED},
    {"host key is known for", SSH_EHOSTKEY_UNKNOWN},
    {"Host key verification failed", SSH_EHOSTKEY_UNKNOWN},
    {"Permission denied (", SSH_EAUTH},
    {"Too many authentication failures", SSH_EAUTH},
    {"Connection refused", SSH_EUNREACHABLE},
    {"No route to host", SSH_EUNREACHABLE},
    {"Connection timed out", SSH_EUNREACHABLE},
    {"Operation timed out", SSH_EUNREACHABLE},
    {"Network is unreachable", SSH_EUNREACHABLE},
    {"Could not resolve hostname", SSH_EUNREACHABLE},
    {"Name or service not known", SSH_EUNREACHABLE},
    {"timed out during banner exchange", SSH_EUNREACHABLE},
};

/* The line of text holding `at`, or the last non-empty line, into dst. */
static void detail_line(char *dst, size_t size, const char *text, const char *at) {
  const char *start = NULL, *end = NULL;
  if (at) {
    start = at;
    while (start > text && start[-1] != '\n')
      start--;
    end = strchr(at, '\n');
  } else {
    const char *p = text;
    while (*p) {
      const char *nl = strchr(p, '\n');
      const char *e = nl ? nl : p + strlen(p);
      const char *q = p;
      while (q < e && (*q == ' ' || *q == '\r' || *q == '\t'))
        q++;
      if (q < e) {
        start = p;
        end = e;
      }
      p = nl ? nl + 1 : e;
    }
  }
  if (!start) {
    dc_strlcpy(dst, "no message from ssh", size);
    return;
  }
  if (!end)
    end = start + strlen(start);
  while (end > start && (end[-1] == '\r' || end[-1] == ' ' || end[-1] == '.'))
    end--;
  char line[DETAIL_MAX + 1];
  size_t n = (size_t)(end - start) < DETAIL_MAX ? (size_t)(end - start) : DETAIL_MAX;
  memcpy(line, start, n);
  line[n] = '\0';
  printable(dst, size, line, DETAIL_MAX);
}

static ssh_status classify(const char *text, char *detail, size_t size) {
  for (size_t i = 0; i < sizeof PATTERNS / sizeof PATTERNS[0]; i++) {
    const char *at = strstr(text, PATTERNS[i].text);
    if (at) {
      /* The changed-key banner's useful line is the one naming the host. */
      const char *line = PATTERNS[i].status == SSH_EHOSTKEY_CHANGED
                             ? strstr(text, "Host key for")
                             : NULL;
      detail_line(detail, size, text, line ? line : at);
      return PATTERNS[i].status;
    }
  }
  detail_line(detail, size, text, NULL);
  return SSH_ETRANSPORT;
}

static void failure_message(char *err, ssh_status s, const ssh_ctx *c,
                            const char *dest, const char *detail) {
  char kh[300] = "";
  if (c->known_hosts)
    dc_fmt(kh, sizeof kh, " (%s)", c->known_hosts);
  switch (s) {
  case SSH_EHOSTKEY_CHANGED:
    dc_fmt(err, DC_ERR_MAX,
           "ssh: the host key of '%s' has CHANGED since it was recorded in known_hosts%s: refusing to connect (%s). "
           "This can be a man-in-the-middle attack; if the host was reinstalled, verify its new key out of band, "
           "then replace the old entry (ssh-keygen -R HOST)",
           dest, kh, detail);
    break;
  case SSH_EHOSTKEY_UNKNOWN:
    dc_fmt(err, DC_ERR_MAX,
           "ssh: the host key of '%s' is not in known_hosts%s: refusing to connect (%s). "
           "Add the host's key after verifying it out of band (ssh-keyscan), or allow first contact with accept_new",
           dest, kh, detail);
    break;
  case SSH_EUNREACHABLE:
    dc_fmt(err, DC_ERR_MAX,
           "ssh: cannot reach '%s': %s (check the address and port, the network path and that sshd runs there; ConnectTimeout is %g s)",
           dest, detail, c->connect_timeout);
    break;
  case SSH_EAUTH:
    dc_fmt(err, DC_ERR_MAX,
           "ssh: '%s' refused our authentication: %s (check the key given by %s and the remote user's authorized_keys)",
           dest, detail, c->key_source ? c->key_source : "the ssh config or agent");
    break;
  case SSH_ECONNLOST:
    dc_fmt(err, DC_ERR_MAX,
           "ssh: the shared connection to '%s' was lost during the command: %s (the next command reconnects; did the host or the network go down?)",
           dest, detail);
    break;
  default:
    dc_fmt(err, DC_ERR_MAX, "ssh: connecting to '%s' failed (ssh exit 255): %s", dest, detail);
    break;
  }
}

/* ---- ops: completion -------------------------------------------------- */

static void host_pump(ssh_host *h);

/* The key's path replaced wherever ssh quoted it. */
static void redact_key(ssh_ctx *c, buf *b) {
  if (!c->key || !b->p)
    return;
  size_t klen = strlen(c->key);
  buf out = {0};
  const char *p = b->p;
  const char *hit;
  while ((hit = strstr(p, c->key)) != NULL) {
    if (buf_add(&out, p, (size_t)(hit - p), (size_t)-1 / 2) != 0 || buf_adds(&out, REDACTED) != 0)
      goto fail;
    p = hit + klen;
  }
  if (out.p == NULL)
    return;  /* nothing to replace */
  if (buf_adds(&out, p) != 0)
    goto fail;
  free(b->p);
  *b = out;
  return;
fail:
  /* Out of memory: drop the text rather than show the path. */
  free(out.p);
  b->len = 0;
  if (b->p)
    b->p[0] = '\0';
}

static void deliver(ssh_op *op) {
  if (op->kind != OP_COMMAND || !op->cb)
    return;
  ssh_result r;
  memset(&r, 0, sizeof r);
  r.status = op->status;
  r.dest = op->h->dest;
  r.exit_status = op->status == SSH_OK ? (int)op->exit_status : -1;
  r.term_signal = op->term_signal;
  r.out = op->out.p ? op->out.p : "";
  r.out_len = op->out.len;
  r.err_text = op->errb.p ? op->errb.p : "";
  r.err_len = op->errb.len;
  r.seconds = (double)(uv_hrtime() - op->t0) / 1e9;
  op->cb(op->payload, &r, op->status == SSH_OK ? NULL : op->err);
}

static void on_op_closed(uv_handle_t *handle) {
  ssh_op *op = handle->data;
  if (--op->open > 0)
    return;
  deliver(op);
  op_free(op);
}

static void close_handle(ssh_op *op, uv_handle_t *handle) {
  if (!uv_is_closing(handle))
    uv_close(handle, on_op_closed);
}

/* Ends the op once. The process handle closes when the child has exited
 * (closing it earlier would leave a zombie nobody reaps). */
static void op_finish(ssh_op *op, ssh_status status, const char *err) {
  if (op->finishing)
    return;
  op->finishing = 1;
  op->status = status;
  if (err)
    dc_strlcpy(op->err, err, sizeof op->err);
  if (op->queued)
    queue_remove(op->h, op);
  if (op->running) {
    op->running = 0;
    op->h->running--;
  }
  uv_timer_stop(&op->timer);
  close_handle(op, (uv_handle_t *)&op->timer);
  if (op->spawned) {
    if (op->has_stdin)
      close_handle(op, (uv_handle_t *)&op->pin);
    close_handle(op, (uv_handle_t *)&op->pout);
    close_handle(op, (uv_handle_t *)&op->perr);
    if (op->exited)
      close_handle(op, (uv_handle_t *)&op->proc);
    else
      uv_process_kill(&op->proc, SIGKILL);
  }
  if (op->input) {
    explicit_bzero(op->input, op->input_len);
  }
}

/* Fails every command waiting on the host with the master's reason. */
static void host_fail_queue(ssh_host *h, ssh_status s, const char *err) {
  ssh_op *op;
  while ((op = queue_pop(h)) != NULL)
    op_finish(op, s, err);
}

static void master_done(ssh_op *op) {
  ssh_host *h = op->h;
  ssh_ctx *c = op->c;
  char detail[DETAIL_MAX + 16], err[DC_ERR_MAX];
  if (op->exit_status == 0 && op->term_signal == 0) {
    h->state = HOST_READY;
    op_finish(op, SSH_OK, NULL);
    host_pump(h);
    return;
  }
  redact_key(c, &op->errb);
  ssh_status s = classify(op->errb.p ? op->errb.p : "", detail, sizeof detail);
  failure_message(err, s, c, h->dest, detail);
  h->state = HOST_IDLE;
  op_finish(op, s, err);
  host_fail_queue(h, s, err);
}

static void command_done(ssh_op *op) {
  ssh_ctx *c = op->c;
  ssh_host *h = op->h;
  char detail[DETAIL_MAX + 16], err[DC_ERR_MAX];
  redact_key(c, &op->errb);
  if (op->exit_status != 255) {
    op_finish(op, SSH_OK, NULL);
  } else {
    const char *text = op->errb.p ? op->errb.p : "";
    ssh_status s = classify(text, detail, sizeof detail);
    /* Through a master, only the shared connection can fail: a master
     * that is gone explains a 255 whatever ssh printed. */
    if (!c->no_sharing && (s == SSH_ETRANSPORT || s == SSH_EUNREACHABLE) &&
        !control_alive(h->control_path)) {
      s = SSH_ECONNLOST;
      if (h->state == HOST_READY)
        h->state = HOST_IDLE;
    }
    failure_message(err, s, c, h->dest, detail);
    op_finish(op, s, err);
  }
  host_pump(h);
}

static void op_done(ssh_op *op) {
  if (op->finishing)
    return;
  switch (op->kind) {
  case OP_MASTER: master_done(op); break;
  case OP_COMMAND: command_done(op); break;
  case OP_EXIT: op_finish(op, SSH_OK, NULL); break;
  }
}

/* ---- ops: I/O ---------------------------------------------------------- */

static void maybe_done(ssh_op *op) {
  if (op->exited && op->out_eof && op->err_eof)
    op_done(op);
}

static void on_alloc(uv_handle_t *handle, size_t hint, uv_buf_t *b) {
  ssh_op *op = handle->data;
  (void)hint;
  /* Copied out at once in on_read: one buffer serves every pipe. */
  *b = uv_buf_init(op->c->scratch, sizeof op->c->scratch);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b) {
  ssh_op *op = s->data;
  int is_out = s == (uv_stream_t *)&op->pout;
  if (op->finishing)
    return;
  if (nread < 0) {
    uv_read_stop(s);
    if (is_out)
      op->out_eof = 1;
    else
      op->err_eof = 1;
    maybe_done(op);
    return;
  }
  if (nread == 0)
    return;
  if (is_out && op->on_output) {
    op->on_output(op->payload, b->base, (size_t)nread);
    return;
  }
  buf *dst = is_out ? &op->out : &op->errb;
  size_t max = is_out ? SSH_OUT_MAX : SSH_ERR_TEXT_MAX;
  if (buf_add(dst, b->base, (size_t)nread, max) != 0) {
    char err[DC_ERR_MAX];
    dc_fmt(err, DC_ERR_MAX,
           "ssh: the %s of the command on '%s' passed %zu bytes: refused, the command was killed (print less, or write to a file and fetch it in parts)",
           is_out ? "output" : "error output", op->h->dest, max);
    op_finish(op, SSH_ETOOBIG, err);
  }
}

static void on_timer(uv_timer_t *t);

static void on_exit_cb(uv_process_t *p, int64_t status, int sig) {
  ssh_op *op = p->data;
  op->exited = 1;
  op->exit_status = status;
  op->term_signal = sig;
  if (op->finishing) {
    close_handle(op, (uv_handle_t *)&op->proc);
    return;
  }
  if (sig != 0 && op->exit_status == 0)
    op->exit_status = 255;  /* killed by someone else: ssh did not finish */
  if (op->out_eof && op->err_eof) {
    op_done(op);
    return;
  }
  /* The pipes may lag a little (a master still holding a mux client's
   * descriptors): wait for them, not forever. */
  uv_timer_stop(&op->timer);
  uv_timer_start(&op->timer, on_timer, DRAIN_MS, 0);
}

static void on_timer(uv_timer_t *t) {
  ssh_op *op = t->data;
  char err[DC_ERR_MAX];
  if (op->exited) {
    op_done(op);  /* the drain is over */
    return;
  }
  if (op->kind == OP_MASTER) {
    dc_fmt(err, DC_ERR_MAX,
           "ssh: cannot reach '%s': no SSH session within %g s (check the network path and that sshd answers)",
           op->h->dest, op->timeout);
    op->h->state = HOST_IDLE;
    op_finish(op, SSH_EUNREACHABLE, err);
    host_fail_queue(op->h, SSH_EUNREACHABLE, err);
    return;
  }
  if (op->spawned)
    dc_fmt(err, DC_ERR_MAX,
           "ssh: the command on '%s' did not finish within %g s: its ssh was killed (raise the timeout, or look at the host)",
           op->h->dest, op->timeout);
  else
    dc_fmt(err, DC_ERR_MAX,
           "ssh: the command on '%s' could not start within %g s: the connection to the host is not up (check the network path; ConnectTimeout is %g s)",
           op->h->dest, op->timeout, op->c->connect_timeout);
  op_finish(op, SSH_ETIMEOUT, err);
}

static void on_written(uv_write_t *req, int status) {
  ssh_op *op = req->data;
  (void)status;  /* ssh that exited early fails the write: its exit says why */
  explicit_bzero(op->input, op->input_len);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  (void)req;
  (void)status;
}

/* ---- ops: spawning ----------------------------------------------------- */

static void add_percent_escaped(strv *s, const char *prefix, const char *value) {
  buf b = {0};
  int r = buf_adds(&b, prefix);
  for (const char *p = value; r == 0 && *p; p++)
    r = *p == '%' ? buf_adds(&b, "%%") : buf_add(&b, p, 1, (size_t)-1 / 2);
  if (r != 0)
    s->failed = 1;
  else
    sv_add(s, b.p);
  free(b.p);
}

/* Options shared by every kind of invocation. Ours come before the user's
 * config (-o is read first, and the first value obtained wins). */
static void common_args(const ssh_ctx *c, strv *s) {
  char opt[64];
  sv_add(s, c->ssh_path);
  if (c->config_file) {
    sv_add(s, "-F");
    sv_add(s, c->config_file);
  }
  sv_opt(s, "BatchMode=yes");
  sv_opt(s, c->accept_new ? "StrictHostKeyChecking=accept-new" : "StrictHostKeyChecking=yes");
  if (c->known_hosts) {
    sv_add(s, "-o");
    add_percent_escaped(s, "UserKnownHostsFile=", c->known_hosts);
  }
  dc_fmt(opt, sizeof opt, "ConnectTimeout=%d", (int)(c->connect_timeout + 0.999));
  sv_opt(s, opt);
  sv_opt(s, "LogLevel=ERROR");
  if (c->key) {
    sv_add(s, "-i");
    add_percent_escaped(s, "", c->key);
    sv_opt(s, "IdentitiesOnly=yes");
  }
  sv_add(s, "-T");
}

static void control_args(const ssh_host *h, strv *s) {
  sv_add(s, "-o");
  add_percent_escaped(s, "ControlPath=", h->control_path);
}

static void dest_args(const ssh_host *h, strv *s) {
  if (h->port[0]) {
    sv_add(s, "-p");
    sv_add(s, h->port);
  }
  sv_add(s, "--");
  sv_add(s, h->target);
}

static int build_argv(ssh_op *op, strv *s) {
  ssh_ctx *c = op->c;
  ssh_host *h = op->h;
  char opt[64];
  common_args(c, s);
  switch (op->kind) {
  case OP_MASTER:
    sv_opt(s, "ControlMaster=yes");
    control_args(h, s);
    dc_fmt(opt, sizeof opt, "ControlPersist=%d", (int)(c->persist + 0.999));
    sv_opt(s, opt);
    dc_fmt(opt, sizeof opt, "ServerAliveInterval=%d", ALIVE_INTERVAL);
    sv_opt(s, opt);
    dc_fmt(opt, sizeof opt, "ServerAliveCountMax=%d", ALIVE_COUNT);
    sv_opt(s, opt);
    sv_add(s, "-N");
    dest_args(h, s);
    break;
  case OP_EXIT:
    control_args(h, s);
    sv_add(s, "-O");
    sv_add(s, "exit");
    dest_args(h, s);
    break;
  case OP_COMMAND:
    if (op->forward) {
      /* Asks the master: no session, no remote command. */
      control_args(h, s);
      sv_add(s, "-O");
      sv_add(s, "forward");
      sv_add(s, "-L");
      sv_add(s, op->forward);
      dest_args(h, s);
      break;
    }
    if (c->no_sharing) {
      sv_opt(s, "ControlMaster=no");
      sv_opt(s, "ControlPath=none");
    } else {
      sv_opt(s, "ControlMaster=no");
      control_args(h, s);
      /* Never a connection of its own when the master is gone. */
      sv_opt(s, "ProxyCommand=false");
    }
    dest_args(h, s);
    sv_add(s, op->command);
    break;
  }
  return s->failed ? -1 : 0;
}

/* Spawns the op's ssh. On failure the op is finished (its callback runs
 * from the loop) and -1 returned. */
static int op_spawn(ssh_op *op) {
  ssh_ctx *c = op->c;
  uv_loop_t *loop = c->e->loop;
  strv argv = {0};
  char err[DC_ERR_MAX];
  if (build_argv(op, &argv) != 0) {
    sv_free(&argv);
    dc_fmt(err, DC_ERR_MAX, "ssh: out of memory starting a command on '%s'", op->h->dest);
    op_finish(op, SSH_ESPAWN, err);
    return -1;
  }
  op->has_stdin = op->input_len > 0 || op->on_output != NULL;
  if (op->has_stdin) {
    uv_pipe_init(loop, &op->pin, 0);
    op->pin.data = op;
    op->open++;
  }
  uv_pipe_init(loop, &op->pout, 0);
  uv_pipe_init(loop, &op->perr, 0);
  op->pout.data = op->perr.data = op->proc.data = op->wr.data = op->sd.data = op;
  op->open += 3;  /* pout, perr, proc */
  uv_stdio_container_t stdio[3];
  if (op->has_stdin) {
    stdio[0].flags = UV_CREATE_PIPE | UV_READABLE_PIPE;
    stdio[0].data.stream = (uv_stream_t *)&op->pin;
  } else {
    stdio[0].flags = UV_IGNORE;  /* /dev/null */
  }
  stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[1].data.stream = (uv_stream_t *)&op->pout;
  stdio[2].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[2].data.stream = (uv_stream_t *)&op->perr;
  uv_process_options_t o;
  memset(&o, 0, sizeof o);
  o.exit_cb = on_exit_cb;
  o.file = argv.v[0];
  o.args = argv.v;
  /* Its own session: a Ctrl-C at the terminal reaches deployctl, which
   * decides what to stop, not every ssh in flight. */
  o.flags = UV_PROCESS_DETACHED;
  o.stdio_count = 3;
  o.stdio = stdio;
  int r = uv_spawn(loop, &op->proc, &o);
  sv_free(&argv);
  op->spawned = 1;
  if (r != 0) {
    op->exited = 1;  /* no exit callback will come */
    dc_fmt(err, DC_ERR_MAX, "ssh: cannot run %s for '%s': %s (install openssh-client, or fix the ssh path)",
           c->ssh_path, op->h->dest, uv_strerror(r));
    op_finish(op, SSH_ESPAWN, err);
    return -1;
  }
  uv_read_start((uv_stream_t *)&op->pout, on_alloc, on_read);
  uv_read_start((uv_stream_t *)&op->perr, on_alloc, on_read);
  if (op->input_len > 0) {
    uv_buf_t b = uv_buf_init(op->input, (unsigned)op->input_len);
    if (uv_write(&op->wr, (uv_stream_t *)&op->pin, &b, 1, on_written) != 0)
      explicit_bzero(op->input, op->input_len);
  }
  if (op->has_stdin && !op->on_output)
    uv_shutdown(&op->sd, (uv_stream_t *)&op->pin, on_shutdown);
  return 0;
}

static ssh_op *op_new(ssh_ctx *c, ssh_host *h, op_kind kind) {
  ssh_op *op = calloc(1, sizeof *op);
  if (!op)
    return NULL;
  op->c = c;
  op->h = h;
  op->kind = kind;
  op->t0 = uv_hrtime();
  op->exit_status = -1;
  uv_timer_init(c->e->loop, &op->timer);
  op->timer.data = op;
  op->open = 1;
  ops_link(c, op);
  return op;
}

static void start_timer(ssh_op *op) {
  if (op->timeout > 0)
    uv_timer_start(&op->timer, on_timer, (uint64_t)(op->timeout * 1000.0 + 0.5), 0);
}

static void start_master(ssh_host *h, ssh_ctx *c) {
  char err[DC_ERR_MAX];
  ssh_op *op = op_new(c, h, OP_MASTER);
  if (!op) {
    dc_fmt(err, DC_ERR_MAX, "ssh: out of memory connecting to '%s'", h->dest);
    host_fail_queue(h, SSH_ESPAWN, err);
    return;
  }
  h->state = HOST_CONNECTING;
  h->connections++;
  op->timeout = 2 * c->connect_timeout + MASTER_SLACK_S;
  start_timer(op);
  /* A stale socket (its master killed) would make ssh refuse to listen. */
  unlink(h->control_path);
  if (op_spawn(op) != 0) {
    h->state = HOST_IDLE;
    host_fail_queue(h, SSH_ESPAWN, op->err);
  }
}

/* Starts what can start: a master when none is up, else queued commands
 * while session slots are free. */
static void host_pump(ssh_host *h) {
  ssh_ctx *c = h->c;
  if (!h->qhead || c->closing)
    return;
  if (!c->no_sharing) {
    if (h->state == HOST_READY && !control_alive(h->control_path))
      h->state = HOST_IDLE;  /* idle past ControlPersist, or its link died */
    if (h->state == HOST_IDLE)
      start_master(h, c);
    if (h->state != HOST_READY)
      return;
  }
  while (h->qhead && h->running < c->max_sessions) {
    ssh_op *op = queue_pop(h);
    if (c->no_sharing)
      h->connections++;
    if (op_spawn(op) == 0) {
      op->running = 1;
      h->running++;
    }
  }
}

/* ---- ending a master without a client process ------------------------
 *
 * OpenSSH's multiplexing protocol (PROTOCOL.mux in its sources): messages
 * are a uint32 length then the body, integers big-endian. Both sides say
 * hello (MUX_MSG_HELLO, version 4), then MUX_C_TERMINATE asks the master
 * to exit and it answers MUX_S_OK. That is what `ssh -O exit` sends; doing
 * it here spares one ssh process per host at the end of every run (each
 * costs tens of milliseconds of CPU and a fork from the loop). */

#define MUX_MSG_HELLO 0x00000001u
#define MUX_C_TERMINATE 0x10000005u
#define MUX_S_OK 0x80000001u
#define MUX_VERSION 4u
#define MUX_TIMEOUT_MS 1000

static void put_u32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)(v >> 24);
  p[1] = (unsigned char)(v >> 16);
  p[2] = (unsigned char)(v >> 8);
  p[3] = (unsigned char)v;
}

static uint32_t get_u32(const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static int write_all(int fd, const unsigned char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* 0, -1 on an error or timeout, -2 at end of stream. */
static int read_all(int fd, unsigned char *p, size_t n) {
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r == 0)
      return -2;
    if (r < 0)
      return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

/* One message into body (at most size bytes kept; the rest is read and
 * dropped); its type, or 0 on failure, with *eof set when the master
 * closed the socket before a message began. */
static uint32_t mux_read(int fd, unsigned char *body, size_t size, size_t *len, int *eof) {
  unsigned char hdr[4], skip[64];
  int r = read_all(fd, hdr, 4);
  *eof = r == -2;
  if (r != 0)
    return 0;
  size_t n = get_u32(hdr);
  if (n < 4 || n > 65536)
    return 0;
  size_t keep = n < size ? n : size;
  if (read_all(fd, body, keep) != 0)
    return 0;
  for (size_t left = n - keep; left > 0;) {
    size_t k = left < sizeof skip ? left : sizeof skip;
    if (read_all(fd, skip, k) != 0)
      return 0;
    left -= k;
  }
  *len = keep;
  return get_u32(body);
}

/* 0 once the master listening on path said it exits. Blocking, bounded by
 * MUX_TIMEOUT_MS per read or write: the master is local and answers at
 * once unless it is wedged, and then `ssh -O exit` takes over. */
static int mux_terminate(const char *path) {
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (strlen(path) >= sizeof sa.sun_path)
    return -1;
  memcpy(sa.sun_path, path, strlen(path) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  struct timeval tv = {MUX_TIMEOUT_MS / 1000, (MUX_TIMEOUT_MS % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  unsigned char msg[12], body[64];
  size_t len = 0;
  int ok = -1, eof = 0;
  put_u32(msg, 8);
  put_u32(msg + 4, MUX_MSG_HELLO);
  put_u32(msg + 8, MUX_VERSION);
  /* Hello both ways first: the master reads one message per wake-up, so
   * the terminate goes only once its hello came back. */
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 && write_all(fd, msg, 12) == 0 &&
      mux_read(fd, body, sizeof body, &len, &eof) == MUX_MSG_HELLO && len >= 8 &&
      get_u32(body + 4) == MUX_VERSION) {
    put_u32(msg + 4, MUX_C_TERMINATE);
    put_u32(msg + 8, 1); /* request id */
    /* The master may exit before its MUX_S_OK is out: the socket then
     * closes with no answer, which `ssh -O exit` takes as done too. */
    if (write_all(fd, msg, 12) == 0) {
      uint32_t type = mux_read(fd, body, sizeof body, &len, &eof);
      if ((type == MUX_S_OK && len >= 8 && get_u32(body + 4) == 1) || (type == 0 && eof))
        ok = 0;
    }
  }
  close(fd);
  return ok;
}

/* `ssh -O exit`: the master ends now instead of after ControlPersist. */
static void spawn_exit(ssh_host *h) {
  ssh_op *op = op_new(h->c, h, OP_EXIT);
  if (!op)
    return;
  op->timeout = MASTER_SLACK_S;
  start_timer(op);
  op_spawn(op);
}

/* ---- public ------------------------------------------------------------ */

int ssh_ctx_connections(const ssh_ctx *c, const char *dest) {
  for (const ssh_host *h = c ? c->hosts : NULL; h; h = h->next) {
    if (strcmp(h->dest, dest) == 0)
      return h->connections;
  }
  return 0;
}

int ssh_run(ssh_op **out, ssh_ctx *c, const ssh_request *req, ssh_cb cb,
            void *payload, char *err) {
  if (out)
    *out = NULL;
  if (c->closing) {
    dc_fmt(err, DC_ERR_MAX, "ssh: the ssh context is closing: no new commands");
    return -1;
  }
  if (!req->command || !*req->command) {
    dc_fmt(err, DC_ERR_MAX, "ssh: empty command for '%s': give the remote shell command to run",
           req->dest ? req->dest : "");
    return -1;
  }
  if (!(req->timeout >= 0) || req->timeout > 1e6) {
    dc_fmt(err, DC_ERR_MAX, "ssh: timeout %g is not between 0 (none) and 1000000 seconds", req->timeout);
    return -1;
  }
  if (!cb) {
    dc_fmt(err, DC_ERR_MAX, "ssh: ssh_run needs a callback");
    return -1;
  }
  ssh_host *h = host_get(c, req->dest, err);
  if (!h)
    return -1;
  ssh_op *op = op_new(c, h, OP_COMMAND);
  if (op) {
    op->command = strdup(req->command);
    if (req->stdin_len > 0) {
      op->input = malloc(req->stdin_len);
      if (op->input) {
        memcpy(op->input, req->stdin_data, req->stdin_len);
        op->input_len = req->stdin_len;
      }
    }
  }
  if (!op || !op->command || (req->stdin_len > 0 && !op->input)) {
    if (op) {
      op->finishing = 1;
      close_handle(op, (uv_handle_t *)&op->timer);  /* cb is not set yet */
    }
    dc_fmt(err, DC_ERR_MAX, "ssh: out of memory starting a command on '%s'", req->dest);
    return -1;
  }
  op->cb = cb;
  op->payload = payload;
  op->on_output = req->on_output;
  op->timeout = req->timeout;
  start_timer(op);
  queue_push(h, op);
  if (out)
    *out = op;
  host_pump(h);
  return 0;
}

static int plain_path(const char *what, const char *path, char *err);

int ssh_forward(ssh_op **out, ssh_ctx *c, const char *dest, const char *remote_socket, char *local,
                size_t local_size, double timeout, ssh_cb cb, void *payload, char *err) {
  if (out)
    *out = NULL;
  if (c->closing || c->no_sharing) {
    dc_fmt(err, DC_ERR_MAX, "ssh: %s: no forward to '%s'",
           c->closing ? "the ssh context is closing" : "forwarding needs connection sharing", dest ? dest : "");
    return -1;
  }
  /* ssh splits LOCAL:REMOTE at the colon and -L's value at whitespace. */
  if (!remote_socket || remote_socket[0] != '/' || strchr(remote_socket, ':') ||
      strlen(remote_socket) >= sizeof(((struct sockaddr_un *)0)->sun_path) ||
      plain_path("the remote socket path", remote_socket, err) != 0) {
    dc_fmt(err, DC_ERR_MAX, "ssh: the socket to reach on '%s' must be an absolute path of at most %zu bytes, "
           "without ':', quotes or whitespace", dest ? dest : "", sizeof(((struct sockaddr_un *)0)->sun_path) - 1);
    return -1;
  }
  if (!cb || !(timeout >= 0) || timeout > 1e6) {
    dc_fmt(err, DC_ERR_MAX, "ssh: ssh_forward needs a callback and a timeout of 0-1000000 s");
    return -1;
  }
  ssh_host *h = host_get(c, dest, err);
  if (!h)
    return -1;
  char path[SSH_CONTROL_DIR_MAX + 16];
  dc_fmt(path, sizeof path, "%s/f%d", c->dir, c->nforwards + 1);
  if (strlen(path) + 1 > local_size) {
    dc_fmt(err, DC_ERR_MAX, "ssh: no room for the forward's path");
    return -1;
  }
  ssh_op *op = op_new(c, h, OP_COMMAND);
  buf spec = {0};
  int bad = !op || buf_adds(&spec, path) != 0 || buf_adds(&spec, ":") != 0 || buf_adds(&spec, remote_socket) != 0;
  if (bad) {
    free(spec.p);
    if (op) {
      op->finishing = 1;
      close_handle(op, (uv_handle_t *)&op->timer);
    }
    dc_fmt(err, DC_ERR_MAX, "ssh: out of memory forwarding to '%s'", dest);
    return -1;
  }
  c->nforwards++;
  unlink(path);
  dc_strlcpy(local, path, local_size);
  op->forward = spec.p;
  op->cb = cb;
  op->payload = payload;
  op->timeout = timeout;
  start_timer(op);
  queue_push(h, op);
  if (out)
    *out = op;
  host_pump(h);
  return 0;
}

void ssh_cancel(ssh_op *op) {
  char err[DC_ERR_MAX];
  if (!op || op->finishing)
    return;
  dc_fmt(err, DC_ERR_MAX, "ssh: the command on '%s' was cancelled", op->h->dest);
  op_finish(op, SSH_ECANCELLED, err);
  host_pump(op->h);
}

/* ---- the context ------------------------------------------------------- */

/* Values that go into `-o NAME=VALUE`, where ssh splits on whitespace and
 * reads quotes. */
static int plain_path(const char *what, const char *path, char *err) {
  for (const char *p = path; *p; p++) {
    unsigned char ch = (unsigned char)*p;
    if (ch <= ' ' || ch == 0x7f || ch == '"' || ch == '\'' || ch == '\\') {
      dc_fmt(err, DC_ERR_MAX,
             "ssh: %s holds whitespace, a quote, a backslash or a control character, which ssh would misread: use a plain path",
             what);
      return -1;
    }
  }
  return 0;
}

static int setup_dir(ssh_ctx *c, const char *dir, char *err) {
  struct stat st;
  if (!dir || !*dir) {
    char tmpl[] = "/tmp/deployctl-ssh-XXXXXX";
    if (!mkdtemp(tmpl)) {
      dc_fmt(err, DC_ERR_MAX, "ssh: cannot create a control directory under /tmp: %s (check that /tmp is writable)",
             strerror(errno));
      return -1;
    }
    dc_strlcpy(c->dir, tmpl, sizeof c->dir);
    c->dir_is_ours = 1;
    return 0;
  }
  if (strlen(dir) > SSH_CONTROL_DIR_MAX) {
    dc_fmt(err, DC_ERR_MAX,
           "ssh: control directory '%.80s...' is longer than %d bytes: unix socket paths hold 108, choose a shorter one",
           dir, SSH_CONTROL_DIR_MAX);
    return -1;
  }
  if (plain_path("the control directory", dir, err) != 0)
    return -1;
  dc_strlcpy(c->dir, dir, sizeof c->dir);
  if (mkdir(dir, 0700) == 0) {
    c->dir_is_ours = 1;
  } else if (errno != EEXIST) {
    dc_fmt(err, DC_ERR_MAX, "ssh: cannot create control directory '%s': %s", dir, strerror(errno));
    return -1;
  }
  if (lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
    dc_fmt(err, DC_ERR_MAX, "ssh: control directory '%s' is not a directory (or is a symlink): choose another", dir);
    return -1;
  }
  if (st.st_uid != geteuid() || (st.st_mode & 077) != 0) {
    dc_fmt(err, DC_ERR_MAX,
           "ssh: control directory '%s' must be ours and private (mode 0700, now %03o): its sockets give access to the hosts; chmod 700 it or choose another",
           dir, (unsigned)(st.st_mode & 0777));
    return -1;
  }
  return 0;
}

/* The key as text: a 0600 file in our private directory. */
static int write_key(ssh_ctx *c, const char *text, char *err) {
  char path[SSH_CONTROL_DIR_MAX + 16];
  dc_fmt(path, sizeof path, "%s/key", c->dir);
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    dc_fmt(err, DC_ERR_MAX, "ssh: cannot write the key given by %s into '%s': %s",
           c->key_source, c->dir, strerror(errno));
    return -1;
  }
  c->key_is_ours = 1;
  c->key = strdup(path);
  size_t n = strlen(text);
  int ok = c->key != NULL && write(fd, text, n) == (ssize_t)n;
  /* OpenSSH refuses a key whose last line has no newline. */
  if (ok && (n == 0 || text[n - 1] != '\n'))
    ok = write(fd, "\n", 1) == 1;
  close(fd);
  if (!ok) {
    dc_fmt(err, DC_ERR_MAX, "ssh: cannot write the key given by %s into '%s'", c->key_source, c->dir);
    return -1;
  }
  return 0;
}

static int setup_key(ssh_ctx *c, const ssh_opts *o, char *err) {
  const char *k = o->key_path;
  const char *source = "the configured ssh key";
  if (!k || !*k) {
    k = getenv("DEPLOY_SSH_KEY");
    source = "DEPLOY_SSH_KEY";
  }
  if (!k || !*k)
    return 0;
  c->key_source = strdup(source);
  if (!c->key_source) {
    dc_fmt(err, DC_ERR_MAX, "ssh: out of memory");
    return -1;
  }
  if (strncmp(k, KEY_PEM_PREFIX, strlen(KEY_PEM_PREFIX)) == 0)
    return write_key(c, k, err);
  /* Never the path in a message: only where it came from. */
  struct stat st;
  int fd = open(k, O_RDONLY | O_CLOEXEC);
  if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    int e = fd < 0 ? errno : EINVAL;
    if (fd >= 0)
      close(fd);
    dc_fmt(err, DC_ERR_MAX, "ssh: the private key named by %s cannot be read (%s): fix %s",
           source, e == EINVAL ? "not a regular file" : strerror(e), source);
    return -1;
  }
  close(fd);
  c->key = strdup(k);
  if (!c->key) {
    dc_fmt(err, DC_ERR_MAX, "ssh: out of memory");
    return -1;
  }
  return 0;
}

static int check_numbers(const ssh_opts *o, char *err) {
  /* Written so that NaN fails too. */
  if (!(o->connect_timeout >= 0 && o->connect_timeout <= 3600)) {
    dc_fmt(err, DC_ERR_MAX, "ssh: connect_timeout %g is not between 0 (default 10) and 3600 seconds",
           o->connect_timeout);
    return -1;
  }
  if (!(o->persist >= 0 && o->persist <= 86400)) {
    dc_fmt(err, DC_ERR_MAX, "ssh: persist %g is not between 0 (default 600) and 86400 seconds", o->persist);
    return -1;
  }
  if (o->max_sessions < 0 || o->max_sessions > 1000) {
    dc_fmt(err, DC_ERR_MAX, "ssh: max_sessions %d is not between 0 (default 8) and 1000 (keep it below sshd's MaxSessions, 10 by default)",
           o->max_sessions);
    return -1;
  }
  return 0;
}

static int setup(ssh_ctx *c, const ssh_opts *o, char *err) {
  const char *bin = o->ssh_path && *o->ssh_path ? o->ssh_path : SSH_DEFAULT_BIN;
  if (check_numbers(o, err) != 0)
    return -1;
  if (access(bin, X_OK) != 0) {
    dc_fmt(err, DC_ERR_MAX, "ssh: %s cannot be run (%s): install openssh-client (scripts/setup does)",
           bin, strerror(errno));
    return -1;
  }
  if (o->config_file && *o->config_file && access(o->config_file, R_OK) != 0) {
    dc_fmt(err, DC_ERR_MAX, "ssh: config file '%s' cannot be read (%s): fix the ssh config path",
           o->config_file, strerror(errno));
    return -1;
  }
  if (o->known_hosts && *o->known_hosts && plain_path("the known_hosts path", o->known_hosts, err) != 0)
    return -1;
  c->ssh_path = strdup(bin);
  c->config_file = o->config_file && *o->config_file ? strdup(o->config_file) : NULL;
  c->known_hosts = o->known_hosts && *o->known_hosts ? strdup(o->known_hosts) : NULL;
  if (!c->ssh_path || (o->config_file && *o->config_file && !c->config_file) ||
      (o->known_hosts && *o->known_hosts && !c->known_hosts)) {
    dc_fmt(err, DC_ERR_MAX, "ssh: out of memory");
    return -1;
  }
  c->accept_new = o->accept_new != 0;
  c->no_sharing = o->no_sharing != 0;
  c->connect_timeout = o->connect_timeout > 0 ? o->connect_timeout : DEFAULT_CONNECT_TIMEOUT;
  c->persist = o->persist > 0 ? o->persist : DEFAULT_PERSIST;
  c->max_sessions = o->max_sessions > 0 ? o->max_sessions : DEFAULT_MAX_SESSIONS;
  if (setup_dir(c, o->control_dir, err) != 0)
    return -1;
  return setup_key(c, o, err);
}

int ssh_ctx_new(ssh_ctx **out, engine *e, const ssh_opts *o, char *err) {
  static const ssh_opts defaults;
  *out = NULL;
  ssh_ctx *c = calloc(1, sizeof *c);
  if (!c) {
    dc_fmt(err, DC_ERR_MAX, "ssh: out of memory");
    return -1;
  }
  c->e = e;
  c->ops.next = c->ops.prev = &c->ops;
  if (setup(c, o ? o : &defaults, err) != 0) {
    ctx_destroy(c);
    return -1;
  }
  *out = c;
  return 0;
}

void ssh_ctx_free(ssh_ctx *c) {
  char err[DC_ERR_MAX];
  if (!c || c->closing)
    return;
  c->closing = 1;
  dc_fmt(err, DC_ERR_MAX, "ssh: cancelled: the ssh context was closed");
  /* op_finish never unlinks (that waits for the close callbacks), so the
   * walk is safe. */
  for (ssh_op *op = c->ops.next; op != &c->ops; op = op->next) {
    if (op->kind != OP_EXIT)
      op_finish(op, SSH_ECANCELLED, err);
  }
  /* A master still connecting was killed above, but may already have
   * forked its background half (which listens before it forks). */
  for (ssh_host *h = c->hosts; h; h = h->next) {
    if (h->state == HOST_IDLE)
      continue;
    /* A master still connecting may have forked its background half
     * without answering yet: ssh -O exit, as before. */
    if (h->state == HOST_READY && mux_terminate(h->control_path) == 0)
      continue;
    spawn_exit(h);
  }
  if (c->ops.next == &c->ops)
    ctx_destroy(c);
}
