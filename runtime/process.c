/* The process provider: every instance is `/bin/sh -c <command>` started
 * detached (its own session and process group), so it outlives deployctl.
 *
 * A command that is one simple command runs as `exec <command>` (see
 * simple_command): the recorded pid is then the service's own.
 *
 * Identity: a pid alone may be reused, so an instance's handle is
 * "<pid>:<start time>", and its environment carries
 * DEPLOY_INSTANCE=<store location>#<instance id> so a process whose handle
 * was never recorded can still be found (inspect does).
 *
 * Children we spawn stay registered with libuv (unreferenced, so they never
 * keep the loop alive): libuv reaps them when they exit, so no zombie piles
 * up and dc_proc_alive sees them dead. Processes started by an earlier
 * deployctl run were reparented to init, which reaps them.
 *
 * Secrets: `${NAME}` in the command is not expanded here. The instance
 * inherits the environment, so /bin/sh expands it itself when it runs the
 * command: the value never appears in the `sh -c` argument that `ps` shows
 * every local user (the program's own arguments are the command's author's
 * choice: a program that reads its token from the environment keeps it out
 * of `ps` entirely). provider.env values are expanded into the child's
 * environment only; they exist on the heap during start, are wiped before
 * being freed, and never reach the store, the log or an error message.
 *
 * Every callback runs from the loop: work that completes at once (a spawn,
 * a look at /proc) is delivered through a zero timer the provider owns. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* explicit_bzero, dprintf, getsid, strdup */
#endif

#include "provider.h"
#include "logprune.h"
#include "util.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define POLL_MS 25                         /* stop: how often we look again */
#define KILL_GRACE_NS (5ULL * 1000000000ULL) /* after SIGKILL, before giving up */
#define RECENT_PORTS 64
#define RECENT_PORT_NS (5ULL * 1000000000ULL)
#define EXPAND_MAX 16384                   /* an expanded command or env value */
#define ENVIRON_MAX (4 * 1024 * 1024)      /* /proc/PID/environ read limit */
#define DEFAULT_LOG_DIR ".deploy/logs"
#define LOOPBACK "127.0.0.1"

typedef struct process_provider process_provider;

/* Every handle the provider owns begins with this link, so free() can close
 * them all, and the provider itself is released by the last close callback
 * (libuv forbids freeing a handle's memory before then). */
typedef struct owned owned;
struct owned {
  owned *prev, *next;
  uv_handle_t *handle;
  process_provider *p;
  void *heap;  /* freed with it */
};

typedef struct child {
  owned link;  /* first: the close callback frees through it */
  uv_process_t proc;
} child;

typedef struct stop_op {
  owned link;  /* first */
  uv_timer_t timer;
  int pid;
  uint64_t pid_start;
  int group;           /* signals went to the process group */
  int killed;          /* SIGKILL sent */
  uint64_t kill_at;    /* uv_hrtime() deadlines */
  uint64_t give_up_at;
  provider_cb cb;
  void *payload;
  char err[DC_ERR_MAX];  /* lives until the close callback, after cb */
} stop_op;

/* A result computed at once and delivered from the loop (start, inspect):
 * the caller's callback never runs inside the call. */
typedef enum { LATER_START, LATER_INSPECT } later_kind;
typedef struct later {
  owned link;  /* first */
  uv_timer_t timer;
  later_kind kind;
  void *cb;
  void *payload;
  int ok;              /* start: started; inspect: alive */
  int found;           /* inspect: found by tag */
  provider_instance pi;
  char err[DC_ERR_MAX];
} later;

/* A logs call: the tail first, then (follow) whatever the file grows by,
 * looked at every FOLLOW_MS. */
struct provider_stream {
  owned link;  /* first */
  uv_timer_t timer;
  provider_logs_cb cb;
  void *payload;
  char *path;
  int lines;
  int follow;
  int started;         /* the tail was delivered */
  int ending;          /* done is due at the next tick */
  off_t offset;        /* how far the file was delivered */
  char err[DC_ERR_MAX];
};

/* A port handed out recently: the store only knows it once the instance
 * is running, so a second start in between must skip it. */
typedef struct recent_port {
  int port;
  uint64_t until;  /* uv_hrtime() */
} recent_port;

struct process_provider {
  provider base;  /* first: provider* and process_provider* convert */
  engine *e;
  char *command;
  char *log_dir;  /* absolute */
  char *workdir;  /* NULL: ours */
  char *tag_prefix;
  char **env;     /* NULL-terminated copy */
  int port_min, port_max;
  double stop_timeout;
  recent_port recent[RECENT_PORTS];
  owned handles;  /* list sentinel */
  int works;      /* prunes on the thread pool: the provider outlives them */
  int closing;
};

/* ---- small helpers ---- */

static void wipe_free(char *s) {
  if (!s)
    return;
  explicit_bzero(s, strlen(s));
  free(s);
}

/* "NAME=value" on the heap, or NULL. */
static char *join3(const char *a, const char *sep, const char *b) {
  size_t na = strlen(a), ns = strlen(sep), nb = strlen(b);
  char *s = malloc(na + ns + nb + 1);
  if (!s)
    return NULL;
  memcpy(s, a, na);
  memcpy(s + na, sep, ns);
  memcpy(s + na + ns, b, nb + 1);
  return s;
}

/* Messages from util.c start with "deploy: "; ours wrap them in a sentence
 * that already starts so. */
static const char *reason(const char *msg) { return dc_unprefix(msg); }

static void free_strv(char **v) {
  for (size_t i = 0; v && v[i]; i++)
    free(v[i]);
  free(v);
}

/* ---- owned handles and the provider's lifetime ---- */

static void own(process_provider *p, owned *o, uv_handle_t *h) {
  o->p = p;
  o->handle = h;
  h->data = o;
  o->next = &p->handles;
  o->prev = p->handles.prev;
  p->handles.prev->next = o;
  p->handles.prev = o;
}

static void destroy(process_provider *p) {
  free(p->command);
  free(p->log_dir);
  free(p->workdir);
  free(p->tag_prefix);
  free_strv(p->env);
  free(p);
}

static void on_closed(uv_handle_t *h) {
  owned *o = h->data;
  process_provider *p = o->p;
  o->prev->next = o->next;
  o->next->prev = o->prev;
  free(o->heap);
  free(o);
  if (p->closing && p->handles.next == &p->handles && p->works == 0)
    destroy(p);
}

static void close_owned(owned *o) {
  if (!uv_is_closing(o->handle))
    uv_close(o->handle, on_closed);
}

/* Instances keep running: they outlive deployctl by design. Stops still in
 * progress are abandoned and their callbacks never run (the caller is going
 * away); a child that exits after this is reaped by init once we exit. */
static void pp_free(provider *base) {
  process_provider *p = (process_provider *)base;
  if (!p)
    return;
  p->closing = 1;
  for (owned *o = p->handles.next; o != &p->handles; o = o->next)
    close_owned(o);
  if (p->handles.next == &p->handles && p->works == 0)
    destroy(p);
}

/* ---- allocate ---- */

static int recent_has(const process_provider *p, int port, uint64_t now) {
  for (size_t i = 0; i < RECENT_PORTS; i++) {
    if (p->recent[i].port == port && p->recent[i].until > now)
      return 1;
  }
  return 0;
}

static void recent_add(process_provider *p, int port, uint64_t now) {
  size_t oldest = 0;
  for (size_t i = 1; i < RECENT_PORTS; i++) {
    if (p->recent[i].until < p->recent[oldest].until)
      oldest = i;
  }
  p->recent[oldest].port = port;
  p->recent[oldest].until = now + RECENT_PORT_NS;
}

/* 1 when a TCP socket can bind 127.0.0.1:port right now, 0 when not, -1
 * (errno set) when we could not even try. SO_REUSEADDR as servers use it, so
 * a port in TIME_WAIT counts as free, a listening one does not. */
static int port_bindable(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int r = bind(fd, (struct sockaddr *)&sa, sizeof sa);
  int saved = errno;
  close(fd);
  if (r == 0)
    return 1;
  if (saved == EADDRINUSE || saved == EACCES)
    return 0;
  errno = saved;
  return -1;
}

static int in_list(const int *v, size_t n, int port) {
  for (size_t i = 0; i < n; i++)
    if (v[i] == port)
      return 1;
  return 0;
}

/* A free port of the range: not handed out recently, not held by an
 * instance row of the store, and bindable now. -1 with why filled. */
static int choose_port(process_provider *p, const provider_start_req *req, char *why) {
  uint64_t now = uv_hrtime();
  int taken = 0;
  for (int port = p->port_min; port <= p->port_max; port++) {
    if (recent_has(p, port, now) || in_list(req->taken, req->ntaken, port)) {
      taken++;
      continue;
    }
    int b = port_bindable(port);
    if (b < 0) {
      dc_fmt(why, DC_ERR_MAX, "cannot test whether port %d is free: %s", port, strerror(errno));
      return -1;
    }
    if (!b) {
      taken++;
      continue;
    }
    recent_add(p, port, now);
    return port;
  }
  dc_fmt(why, DC_ERR_MAX, "no free port in %d-%d for target '%s' (%d in use): widen provider.ports", p->port_min,
         p->port_max, req->inst->target, taken);
  return -1;
}

/* ---- start: expansion and environment ---- */

/* Placeholders first, then ${NAME}: a value taken from the environment is
 * never searched for placeholders. Returns a heap string the caller must
 * wipe_free, or NULL with why filled (never quoting the expansion). */
static char *expand(const char *tmpl, const char *const *pairs, const char *what,
                    char *why) {
  char *tmp = malloc(EXPAND_MAX), *out = malloc(EXPAND_MAX), *res = NULL;
  char uerr[DC_ERR_MAX];
  if (!tmp || !out) {
    dc_fmt(why, DC_ERR_MAX, "out of memory");
  } else if (dc_expand_placeholders(tmp, EXPAND_MAX, tmpl, pairs) != 0) {
    dc_fmt(why, DC_ERR_MAX, "%s is longer than %d bytes after placeholder expansion",
           what, EXPAND_MAX - 1);
  } else if (dc_expand_env(out, EXPAND_MAX, tmp, uerr) != 0) {
    dc_fmt(why, DC_ERR_MAX, "%s: %s", what, reason(uerr));
  } else {
    res = strdup(out);
    if (!res)
      dc_fmt(why, DC_ERR_MAX, "out of memory");
  }
  if (tmp)
    explicit_bzero(tmp, EXPAND_MAX);
  if (out)
    explicit_bzero(out, EXPAND_MAX);
  free(tmp);
  free(out);
  return res;
}

typedef struct env_list {
  char **v;  /* NULL-terminated, owned, wiped when freed */
  size_t n, cap;
} env_list;

static void env_free(env_list *l) {
  for (size_t i = 0; i < l->n; i++)
    wipe_free(l->v[i]);
  free(l->v);
  memset(l, 0, sizeof *l);
}

/* Takes ownership of entry ("NAME=value"); a later entry replaces an earlier
 * one of the same name, since duplicates would leave the winner up to libc. */
static int env_put(env_list *l, char *entry) {
  if (!entry)
    return -1;
  size_t name_len = strcspn(entry, "=") + 1;
  for (size_t i = 0; i < l->n; i++) {
    if (strncmp(l->v[i], entry, name_len) == 0) {
      wipe_free(l->v[i]);
      l->v[i] = entry;
      return 0;
    }
  }
  if (l->n + 2 > l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    char **v = realloc(l->v, cap * sizeof *v);
    if (!v) {
      wipe_free(entry);
      return -1;
    }
    l->v = v;
    l->cap = cap;
  }
  l->v[l->n++] = entry;
  l->v[l->n] = NULL;
  return 0;
}

/* provider.env values: placeholders, then ${NAME} from deployctl's
 * environment (into the child's environment only). */
static int env_put_extra(env_list *l, const char *entry,
                         const char *const *pairs, char *why) {
  size_t name_len = strcspn(entry, "=");
  char name[256];
  dc_fmt(name, sizeof name, "provider.env %.*s", (int)name_len, entry);
  char *value = expand(entry + name_len + 1, pairs, name, why);
  if (!value)
    return -1;
  char *full = malloc(name_len + 1 + strlen(value) + 1);
  if (full) {
    memcpy(full, entry, name_len + 1);
    memcpy(full + name_len + 1, value, strlen(value) + 1);
  }
  wipe_free(value);
  if (env_put(l, full) != 0) {
    dc_fmt(why, DC_ERR_MAX, "out of memory");
    return -1;
  }
  return 0;
}

/* Ours, then provider.env, then DEPLOY_*: the tag must be exact for
 * inspect's search by tag, so nothing may override it. */
static int build_env(const process_provider *p, const store_instance *inst,
                     const char *const *pairs, const char *port_s,
                     env_list *l, char *why) {
  char id[32];
  dc_fmt(id, sizeof id, "%lld", (long long)inst->id);
  for (size_t i = 0; environ && environ[i]; i++) {
    if (env_put(l, strdup(environ[i])) != 0)
      goto oom;
  }
  for (size_t i = 0; p->env && p->env[i]; i++) {
    if (env_put_extra(l, p->env[i], pairs, why) != 0)
      return -1;
  }
  char *tag = join3(p->tag_prefix, "#", id);
  int r = tag ? env_put(l, join3("DEPLOY_INSTANCE", "=", tag)) : -1;
  free(tag);
  if (r != 0 || env_put(l, join3("DEPLOY_PORT", "=", port_s)) != 0 ||
      env_put(l, join3("DEPLOY_VERSION", "=", inst->version)) != 0 ||
      env_put(l, join3("DEPLOY_TARGET", "=", inst->target)) != 0)
    goto oom;
  return 0;
oom:
  dc_fmt(why, DC_ERR_MAX, "out of memory");
  return -1;
}

static const char *env_get(const env_list *l, const char *name, size_t n) {
  for (size_t i = 0; i < l->n; i++)
    if (strncmp(l->v[i], name, n) == 0 && l->v[i][n] == '=')
      return l->v[i] + n + 1;
  return NULL;
}

/* Every ${NAME} of the command must be set in the instance's environment:
 * the shell would expand a missing one to nothing, silently. */
static int check_env_refs(const char *cmd, const env_list *env, char *why) {
  for (const char *p = strstr(cmd, "${"); p; p = strstr(p + 2, "${")) {
    const char *close = strchr(p + 2, '}');
    if (!close) {
      dc_fmt(why, DC_ERR_MAX, "provider.command has an unterminated '${': write ${NAME}");
      return -1;
    }
    size_t n = (size_t)(close - p - 2);
    if (n == 0 || n > 127 || !env_get(env, p + 2, n)) {
      dc_fmt(why, DC_ERR_MAX, "environment variable %.*s is not set (referenced as ${%.*s} in provider.command): "
             "export it or set it in provider.env", (int)n, p + 2, (int)n, p + 2);
      return -1;
    }
  }
  return 0;
}

/* ---- start: log file ---- */

static int mkdir_one(const char *path, char *why) {
  if (mkdir(path, 0755) == 0 || errno == EEXIST)
    return 0;
  dc_fmt(why, DC_ERR_MAX, "cannot create log directory '%s': %s", path, strerror(errno));
  return -1;
}

static int mkdir_p(const char *dir, char *why) {
  char path[4096];
  if (strlen(dir) >= sizeof path) {
    dc_fmt(why, DC_ERR_MAX, "log directory path is too long: shorten provider.log_dir");
    return -1;
  }
  dc_strlcpy(path, dir, sizeof path);
  for (char *s = path + 1; *s; s++) {
    if (*s != '/')
      continue;
    *s = '\0';
    if (mkdir_one(path, why) != 0)
      return -1;
    *s = '/';
  }
  return mkdir_one(path, why);
}

/* Appends (a redeploy of the same version reuses the file) after a header
 * line naming the template only: the expanded command may hold secrets. */
static int open_log(const process_provider *p, const store_instance *inst, provider_instance *pi, char *why) {
  /* 24: '/', two '-', the index and ".log". */
  if (strlen(p->log_dir) + strlen(inst->target) + strlen(inst->version) + 24 >= sizeof pi->log_path) {
    dc_fmt(why, DC_ERR_MAX, "log path under '%s' would exceed %zu bytes: shorten provider.log_dir", p->log_dir,
           sizeof pi->log_path - 1);
    return -1;
  }
  if (mkdir_p(p->log_dir, why) != 0)
    return -1;
  dc_fmt(pi->log_path, sizeof pi->log_path, "%s/%s-%s-%d.log", p->log_dir, inst->target, inst->version, inst->idx);
  int fd = open(pi->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOCTTY, 0644);
  if (fd < 0) {
    dc_fmt(why, DC_ERR_MAX, "cannot open log '%s': %s", pi->log_path, strerror(errno));
    return -1;
  }
  char when[32];
  dc_iso8601(dc_wall_now(), when, sizeof when);
  if (dprintf(fd, "--- deployctl %s: starting %s %s instance %d (id %lld) on %s:%d: %s\n", when, inst->target,
              inst->version, inst->idx, (long long)inst->id, pi->host, pi->port, p->command) < 0) {
    dc_fmt(why, DC_ERR_MAX, "cannot write log '%s': %s", pi->log_path, strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

/* ---- how children ended ---- */

/* The last exits of instances this process started: a supervisor tells a
 * clean exit from a crash by them (restart = "on-failure"). Processes an
 * earlier deployctl started are not our children: their end is not known. */
typedef struct exit_note {
  int pid;
  uint64_t start;
  int exited;
  int64_t status;
  int sig;
} exit_note;

static exit_note exits[256];
static size_t exits_next;

static void note_spawned(int pid, uint64_t start) {
  exits[exits_next % 256] = (exit_note){.pid = pid, .start = start};
  exits_next++;
}

static void note_exit(int pid, int64_t status, int sig) {
  for (size_t i = 0; i < 256; i++) {
    if (exits[i].pid == pid && !exits[i].exited) {
      exits[i].exited = 1;
      exits[i].status = status;
      exits[i].sig = sig;
    }
  }
}

int provider_process_exit_status(int pid, uint64_t start, int *status, int *sig) {
  for (size_t i = 0; i < 256; i++) {
    if (exits[i].pid == pid && exits[i].start == start && exits[i].exited) {
      *status = (int)exits[i].status;
      *sig = exits[i].sig;
      return 1;
    }
  }
  return 0;
}

/* ---- start: spawn ---- */

static void on_child_exit(uv_process_t *h, int64_t status, int sig) {
  note_exit(h->pid, status, sig);
  close_owned(h->data);
}

/* A command that is one simple command (a program, its arguments and
 * redirections, maybe after NAME=value assignments) is run with `exec`,
 * so the instance's pid is the service's own, not that of a /bin/sh
 * waiting for it: signals reach the service, and its exit is the
 * instance's. Anything else (;, &, |, &&, subshells, braces, command
 * substitution, several lines, a reserved word first) runs as written. */
static int simple_command(const char *cmd) {
  static const char *const reserved[] = {"if", "then", "else", "elif", "fi", "for", "while", "until", "do",
                                         "done", "case", "esac", "!", "{", "}", "exec", NULL};
  for (const char *p = cmd; *p; p++) {
    if (strchr(";|`(){}\n\r", *p) || (*p == '$' && p[1] == '('))
      return 0;
    if (*p == '&' && !(p > cmd && (p[-1] == '>' || p[-1] == '<')))
      return 0;
  }
  const char *w = cmd + strspn(cmd, " \t");
  if (!*w)
    return 0;
  for (size_t i = 0; reserved[i]; i++) {
    size_t n = strlen(reserved[i]);
    if (strncmp(w, reserved[i], n) == 0 && (w[n] == '\0' || w[n] == ' ' || w[n] == '\t'))
      return 0;
  }
  return 1;
}

/* "exec CMD", after the leading NAME=value words (they stay assignments:
 * `A=1 exec prog` gives prog A=1). Heap; NULL when out of memory. */
static char *with_exec(const char *cmd) {
  const char *w = cmd + strspn(cmd, " \t");
  for (;;) {
    size_t name = strspn(w, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_");
    if (name == 0 || w[name] != '=' || (w[0] >= '0' && w[0] <= '9'))
      break;
    /* The value runs to the next blank outside quotes. */
    const char *p = w + name + 1;
    char quote = 0;
    for (; *p && (quote || (*p != ' ' && *p != '\t')); p++) {
      if (quote && *p == quote)
        quote = 0;
      else if (!quote && (*p == '\'' || *p == '"'))
        quote = *p;
    }
    if (quote)
      return strdup(cmd);
    w = p + strspn(p, " \t");
  }
  if (!*w)
    return strdup(cmd);
  size_t head = (size_t)(w - cmd);
  size_t size = strlen(cmd) + 6;
  char *out = malloc(size);
  if (out)
    snprintf(out, size, "%.*sexec %s", (int)head, cmd, w);
  return out;
}

static int spawn(process_provider *p, char *cmd, char **env, int log_fd,
                 int *pid, char *why) {
  child *c = calloc(1, sizeof *c);
  if (!c) {
    dc_fmt(why, DC_ERR_MAX, "out of memory");
    return -1;
  }
  char sh[] = "/bin/sh", dash_c[] = "-c";
  char *args[] = {sh, dash_c, cmd, NULL};
  /* stdin UV_IGNORE: libuv gives the child /dev/null. */
  uv_stdio_container_t stdio[3] = {
      {.flags = UV_IGNORE},
      {.flags = UV_INHERIT_FD, .data.fd = log_fd},
      {.flags = UV_INHERIT_FD, .data.fd = log_fd},
  };
  uv_process_options_t o = {
      .exit_cb = on_child_exit, .file = sh, .args = args, .env = env,
      .cwd = p->workdir, .flags = UV_PROCESS_DETACHED,
      .stdio_count = 3, .stdio = stdio,
  };
  int r = uv_spawn(p->e->loop, &c->proc, &o);
  /* Even a failed uv_spawn leaves an initialized handle to close. */
  own(p, &c->link, (uv_handle_t *)&c->proc);
  if (r != 0) {
    close_owned(&c->link);
    dc_fmt(why, DC_ERR_MAX, "/bin/sh: %s", uv_strerror(r));
    return -1;
  }
  /* Registered so libuv reaps it; unreferenced so a long-lived instance
   * never keeps our loop running. */
  uv_unref((uv_handle_t *)&c->proc);
  *pid = c->proc.pid;
  return 0;
}

/* The child has exec'd when uv_spawn returns, so /proc/PID/stat exists
 * (even as a zombie); the retry covers a /proc that lags. */
static uint64_t start_time_of(int pid) {
  uint64_t st = 0;
  for (int i = 0; i < 50 && st == 0; i++) {
    st = dc_proc_start_time(pid);
    if (st == 0)
      nanosleep(&(struct timespec){0, 2000000}, NULL);
  }
  return st;
}

static int check_instance(const process_provider *p, const store_instance *inst,
                          char *why) {
  char uerr[DC_ERR_MAX];
  struct stat st;
  /* target and version become a file name: the validators exclude '/'. */
  if (dc_validate_target_name(inst->target, uerr) != 0 ||
      dc_validate_version(inst->version, "version", uerr) != 0) {
    dc_fmt(why, DC_ERR_MAX, "%s", reason(uerr));
    return -1;
  }
  if (p->workdir && (stat(p->workdir, &st) != 0 || !S_ISDIR(st.st_mode))) {
    dc_fmt(why, DC_ERR_MAX, "workdir '%s' is not a directory: fix provider.workdir",
           p->workdir);
    return -1;
  }
  return 0;
}

static int identify(const process_provider *p, const store_instance *inst, int *pid, uint64_t *start);

/* ---- results delivered from the loop ---- */

static void later_fire(uv_timer_t *t) {
  later *l = t->data;
  void *cb = l->cb;
  /* Closing first: the callback may free the provider; l stays valid
   * until the close callback. */
  close_owned(&l->link);
  switch (l->kind) {
  case LATER_START:
    ((provider_start_cb)cb)(l->payload, l->ok ? &l->pi : NULL, l->ok ? NULL : l->err);
    break;
  case LATER_INSPECT:
    ((provider_inspect_cb)cb)(l->payload, l->ok, l->found ? &l->pi : NULL, l->err[0] ? l->err : NULL);
    break;
  }
}

static later *later_new(process_provider *p, later_kind kind, void *cb, void *payload, char *err) {
  later *l = calloc(1, sizeof *l);
  if (!l) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return NULL;
  }
  l->kind = kind;
  l->cb = cb;
  l->payload = payload;
  uv_timer_init(p->e->loop, &l->timer);
  own(p, &l->link, (uv_handle_t *)&l->timer);
  return l;
}

static void later_go(later *l) { uv_timer_start(&l->timer, later_fire, 0, 0); }

/* ---- start ---- */

static int start_instance(process_provider *p, const provider_start_req *req, provider_instance *pi, char *why) {
  const store_instance *inst = req->inst;
  char port_s[16], idx_s[16];
  if (check_instance(p, inst, why) != 0)
    return -1;
  int port = choose_port(p, req, why);
  if (port < 0)
    return -1;
  dc_strlcpy(pi->host, LOOPBACK, sizeof pi->host);
  pi->port = port;
  dc_fmt(port_s, sizeof port_s, "%d", port);
  dc_fmt(idx_s, sizeof idx_s, "%d", inst->idx);
  const char *pairs[] = {"port", port_s, "version", inst->version, "target", inst->target,
                         "instance", idx_s, "host", pi->host, NULL};
  env_list env = {0};
  int pid = 0, fd = -1, r = -1;
  /* Placeholders only: ${NAME} is left for the shell (see the top). */
  char *cmd = dc_expand_placeholders_dup(p->command, pairs);
  if (cmd && simple_command(cmd)) {
    char *exec_cmd = with_exec(cmd);
    free(cmd);
    cmd = exec_cmd;
  }
  if (!cmd)
    dc_fmt(why, DC_ERR_MAX, "out of memory");
  if (cmd && build_env(p, inst, pairs, port_s, &env, why) == 0 && check_env_refs(cmd, &env, why) == 0)
    fd = open_log(p, inst, pi, why);
  if (fd >= 0)
    r = spawn(p, cmd, env.v, fd, &pid, why);
  if (fd >= 0)
    close(fd);
  free(cmd);
  env_free(&env);
  if (r != 0)
    return -1;
  pi->pid = pid;
  pi->pid_start = start_time_of(pid);
  note_spawned(pid, pi->pid_start);
  dc_fmt(pi->handle, sizeof pi->handle, "%d:%llu", pid, (unsigned long long)pi->pid_start);
  pi->started_at = engine_now(p->e);
  return 0;
}

static int pp_start(provider *base, const provider_start_req *req, provider_start_cb cb, void *payload, char *err) {
  process_provider *p = (process_provider *)base;
  later *l = later_new(p, LATER_START, (void *)cb, payload, err);
  if (!l)
    return -1;
  char why[DC_ERR_MAX];
  l->ok = start_instance(p, req, &l->pi, why) == 0;
  if (!l->ok)
    dc_fmt(l->err, sizeof l->err, "deploy: cannot start instance %d of %s %s: %s", req->inst->idx,
           req->inst->target, req->inst->version, why);
  later_go(l);
  return 0;
}

/* ---- stop ---- */

/* The whole group when the instance leads one (ours always do), so the
 * shell's children go too; else the process alone. ESRCH after both: it
 * exited meanwhile, which is what we wanted. */
static int send_signal(stop_op *op, int sig) {
  if (kill(-op->pid, sig) == 0) {
    op->group = 1;
    return 0;
  }
  op->group = 0;
  if (errno == ESRCH && (kill(op->pid, sig) == 0 || errno == ESRCH))
    return 0;
  dc_fmt(op->err, DC_ERR_MAX, "deploy: cannot signal instance pid %d: %s",
         op->pid, strerror(errno));
  return -1;
}

/* State and process group from /proc/PID/stat. The command name may hold
 * ')' but is at most 15 bytes, so the last ')' is in the first 256. */
static int read_pgrp(int pid, char *state, int *pgrp) {
  char path[64], buf[256];
  dc_fmt(path, sizeof path, "/proc/%d/stat", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return -1;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0)
    return -1;
  buf[n] = '\0';
  char *p = strrchr(buf, ')');
  return p && sscanf(p + 1, " %c %*d %d", state, pgrp) == 2 ? 0 : -1;
}

static int parse_pid(const char *name) {
  char *end;
  long v = strtol(name, &end, 10);
  return (*name && *end == '\0' && v > 1 && v < 1L << 22) ? (int)v : 0;
}

/* kill(-pgid, 0) also succeeds for zombies, which stay forever where init
 * does not reap (some containers): so when it does, look at the members. */
static int group_has_live_member(int pgid) {
  if (kill(-pgid, 0) != 0 && errno == ESRCH)
    return 0;
  DIR *d = opendir("/proc");
  int live = 0;
  for (struct dirent *de = d ? readdir(d) : NULL; de && !live; de = readdir(d)) {
    int pid = parse_pid(de->d_name), pgrp = 0;
    char state = 0;
    if (pid && read_pgrp(pid, &state, &pgrp) == 0)
      live = pgrp == pgid && state != 'Z' && state != 'X';
  }
  if (d)
    closedir(d);
  return live;
}

/* Gone means the process and, when it leads a group, every member of the
 * group: a child that ignored SIGTERM may still hold the port. */
static int instance_gone(const stop_op *op) {
  if (op->pid <= 1)
    return 1;
  if (dc_proc_alive(op->pid, op->pid_start))
    return 0;
  if (!op->group)
    return 1;
  /* Linux never reuses a pid that still names a process group: when another
   * process (or one we cannot tell apart) has the pid, the group is gone
   * and that number is not ours to signal. */
  uint64_t st = dc_proc_start_time(op->pid);
  if (st != 0 && st != op->pid_start)
    return 1;
  return !group_has_live_member(op->pid);
}

static void stop_finish(stop_op *op, const char *err) {
  uv_timer_stop(&op->timer);
  /* Closing first: cb may free the provider, and op (with err) stays valid
   * until the close callback. */
  close_owned(&op->link);
  op->cb(op->payload, err);
}

static void on_stop_tick(uv_timer_t *t) {
  stop_op *op = t->data;
  uint64_t now = uv_hrtime();
  if (instance_gone(op)) {
    stop_finish(op, NULL);
  } else if (!op->killed && now >= op->kill_at) {
    op->killed = 1;
    op->give_up_at = now + KILL_GRACE_NS;
    if (send_signal(op, SIGKILL) != 0)
      stop_finish(op, op->err);
  } else if (op->killed && now >= op->give_up_at) {
    dc_fmt(op->err, DC_ERR_MAX, "deploy: instance pid %d did not exit after SIGKILL",
           op->pid);
    stop_finish(op, op->err);
  }
}

/* Real time on purpose (uv timers, not engine timers): a process takes as
 * long to die on the virtual clock as on the real one. */
static int pp_stop(provider *base, const store_instance *inst, provider_cb cb,
                   void *payload, char *err) {
  process_provider *p = (process_provider *)base;
  stop_op *op = calloc(1, sizeof *op);
  if (!op) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory stopping instance %lld", (long long)inst->id);
    return -1;
  }
  identify(p, inst, &op->pid, &op->pid_start);
  op->cb = cb;
  op->payload = payload;
  op->kill_at = uv_hrtime() + (uint64_t)(p->stop_timeout * 1e9);
  op->group = 1;  /* ours lead their group; send_signal finds out */
  /* instance_gone also refuses pid <= 1: kill(-1) would signal everything. */
  int running = !instance_gone(op);
  if (running && send_signal(op, SIGTERM) != 0) {
    dc_strlcpy(err, op->err, DC_ERR_MAX);
    free(op);
    return -1;
  }
  if (!running)
    op->pid = 0;  /* nothing left to look at: the first tick completes */
  uv_timer_init(p->e->loop, &op->timer);
  own(p, &op->link, (uv_handle_t *)&op->timer);
  /* Already gone: complete from the loop, never from inside this call. */
  uv_timer_start(&op->timer, on_stop_tick, running ? POLL_MS : 0, POLL_MS);
  return 0;
}

/* ---- find an instance by its tag ---- */

/* Whole file, NUL-terminated, *len bytes before the terminator; NULL when
 * unreadable (another user's process, or gone). */
static char *read_small_file(const char *path, size_t *len) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return NULL;
  size_t cap = 8192, n = 0;
  char *buf = malloc(cap + 1);
  while (buf) {
    ssize_t r = read(fd, buf + n, cap - n);
    if (r <= 0)
      break;
    n += (size_t)r;
    if (n == cap) {
      char *bigger = cap * 2 <= ENVIRON_MAX ? realloc(buf, cap * 2 + 1) : NULL;
      if (!bigger)
        break;
      buf = bigger;
      cap *= 2;
    }
  }
  close(fd);
  if (buf) {
    buf[n] = '\0';
    *len = n;
  }
  return buf;
}

static int environ_has(int pid, const char *want, size_t want_len) {
  char path[64];
  size_t len = 0;
  dc_fmt(path, sizeof path, "/proc/%d/environ", pid);
  char *buf = read_small_file(path, &len);
  int found = 0;
  /* Entries are NUL-separated; compare whole entries only. */
  for (size_t i = 0; buf && i < len && !found; i += strlen(buf + i) + 1)
    found = strlen(buf + i) == want_len && memcmp(buf + i, want, want_len) == 0;
  free(buf);
  return found;
}

/* The shell and the program it started both carry the tag; the session
 * leader (the shell, which leads the process group we signal) wins. */
static int find_by_tag(const char *tag) {
  char *want = join3("DEPLOY_INSTANCE", "=", tag);
  DIR *d = want ? opendir("/proc") : NULL;
  int best = 0, self = (int)getpid();
  for (struct dirent *de = d ? readdir(d) : NULL; de; de = readdir(d)) {
    int pid = parse_pid(de->d_name);
    if (pid == 0 || pid == self || !environ_has(pid, want, strlen(want)))
      continue;
    if (!dc_proc_alive(pid, 0))
      continue;
    if (getsid(pid) == pid) {
      best = pid;
      break;
    }
    if (best == 0)
      best = pid;
  }
  if (d)
    closedir(d);
  free(want);
  return best;
}

/* The process of an instance: from its handle ("pid:start"), from its pid
 * columns (rows of schema 1), or, when it was never recorded (deployctl died
 * right after the spawn), from its tag. 0 when none. */
static int identify(const process_provider *p, const store_instance *inst, int *pid, uint64_t *start) {
  unsigned long long st = 0;
  int v = 0;
  *pid = 0;
  *start = 0;
  if (inst->handle[0] && sscanf(inst->handle, "%d:%llu", &v, &st) == 2 && v > 1) {
    *pid = v;
    *start = (uint64_t)st;
    return 0;
  }
  if (inst->pid > 1) {
    *pid = inst->pid;
    *start = inst->pid_start;
    return 0;
  }
  char tag[1200];
  dc_fmt(tag, sizeof tag, "%s#%lld", p->tag_prefix, (long long)inst->id);
  *pid = find_by_tag(tag);
  *start = *pid ? dc_proc_start_time(*pid) : 0;
  return 1; /* found by tag (or not at all) */
}

static int pp_inspect(provider *base, const store_instance *inst, provider_inspect_cb cb, void *payload, char *err) {
  process_provider *p = (process_provider *)base;
  later *l = later_new(p, LATER_INSPECT, (void *)cb, payload, err);
  if (!l)
    return -1;
  int pid;
  uint64_t start;
  int by_tag = identify(p, inst, &pid, &start);
  l->ok = pid > 1 && dc_proc_alive(pid, start);
  if (l->ok && by_tag) {
    l->found = 1;
    dc_strlcpy(l->pi.host, LOOPBACK, sizeof l->pi.host);
    l->pi.port = inst->port;
    l->pi.pid = pid;
    l->pi.pid_start = start;
    dc_fmt(l->pi.handle, sizeof l->pi.handle, "%d:%llu", pid, (unsigned long long)start);
    dc_strlcpy(l->pi.log_path, inst->log_path, sizeof l->pi.log_path);
  }
  later_go(l);
  return 0;
}

/* ---- logs ---- */

#define FOLLOW_MS 200
#define TAIL_MAX (1 << 20)  /* the tail is looked for in the last MiB */
#define CHUNK_MAX 65536

static void stream_done(provider_stream *st) {
  uv_timer_stop(&st->timer);
  /* Closing first: the callback may free the provider. st and its err stay
   * valid until the close callback. */
  close_owned(&st->link);
  st->cb(st->payload, "", 0, 1, st->err[0] ? st->err : NULL);
}

/* The last st->lines lines of the file, delivered; st->offset: its end. */
static int deliver_tail(provider_stream *st, int fd) {
  off_t size = lseek(fd, 0, SEEK_END);
  off_t from = size > TAIL_MAX ? size - TAIL_MAX : 0;
  size_t n = (size_t)(size - from);
  char *text = malloc(n + 1);
  if (!text || pread(fd, text, n, from) != (ssize_t)n) {
    dc_fmt(st->err, sizeof st->err, "deploy: cannot read log '%s': %s", st->path, text ? strerror(errno) : "out of memory");
    free(text);
    return -1;
  }
  size_t at = n;
  int seen = 0;
  if (at > 0 && text[at - 1] == '\n')
    at--;
  while (at > 0 && seen < st->lines) {
    at--;
    if (text[at] == '\n')
      seen++;
  }
  if (seen == st->lines)
    at++;
  st->offset = size;
  if (n > at)
    st->cb(st->payload, text + at, n - at, 0, NULL);
  free(text);
  return 0;
}

/* What was appended since the last look (a file cut shorter is read from
 * its start again). */
static int deliver_new(provider_stream *st, int fd) {
  char buf[CHUNK_MAX];
  off_t size = lseek(fd, 0, SEEK_END);
  if (size < st->offset)
    st->offset = 0;
  while (st->offset < size) {
    ssize_t r = pread(fd, buf, sizeof buf, st->offset);
    if (r <= 0)
      break;
    st->offset += r;
    st->cb(st->payload, buf, (size_t)r, 0, NULL);
  }
  return 0;
}

static void on_stream_tick(uv_timer_t *t) {
  provider_stream *st = t->data;
  if (st->ending) {
    stream_done(st);
    return;
  }
  int fd = open(st->path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    dc_fmt(st->err, sizeof st->err, "deploy: cannot read log '%s': %s", st->path, strerror(errno));
    stream_done(st);
    return;
  }
  int r = st->started ? deliver_new(st, fd) : deliver_tail(st, fd);
  close(fd);
  st->started = 1;
  if (r != 0 || !st->follow)
    stream_done(st);
}

static int pp_logs(provider *base, const store_instance *inst, int lines, int follow, provider_logs_cb cb,
                   void *payload, provider_stream **out, char *err) {
  process_provider *p = (process_provider *)base;
  if (out)
    *out = NULL;
  provider_stream *st = calloc(1, sizeof *st);
  if (!st || !(st->path = strdup(inst->log_path))) {
    free(st);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  st->cb = cb;
  st->payload = payload;
  st->lines = lines > 0 ? lines : 100;
  st->follow = follow;
  if (!inst->log_path[0]) {
    dc_fmt(st->err, sizeof st->err, "deploy: instance %lld has no log yet", (long long)inst->id);
    st->ending = 1;
  }
  uv_timer_init(p->e->loop, &st->timer);
  own(p, &st->link, (uv_handle_t *)&st->timer);
  st->link.heap = st->path;
  uv_timer_start(&st->timer, on_stream_tick, 0, FOLLOW_MS);
  if (out)
    *out = st;
  return 0;
}

static void pp_logs_stop(provider *base, provider_stream *st) {
  (void)base;
  if (!st || st->ending || uv_is_closing((uv_handle_t *)&st->timer))
    return;
  st->ending = 1;
  uv_timer_start(&st->timer, on_stream_tick, 0, 0);
}

/* ---- construction ---- */

static int validate(const provider_process_opts *o, char *err) {
  if (!o->command || !*o->command) {
    dc_fmt(err, DC_ERR_MAX, "provider.command is empty: give the shell command that starts one instance, e.g. './app --port {port}'");
    return -1;
  }
  if (o->port_min > o->port_max) {
    dc_fmt(err, DC_ERR_MAX, "provider.ports: '%d-%d' is empty: write 'LOW-HIGH' with LOW <= HIGH",
           o->port_min, o->port_max);
    return -1;
  }
  if (o->port_min < 1024 || o->port_max > 65535) {
    dc_fmt(err, DC_ERR_MAX, "provider.ports: '%d-%d' is outside 1024-65535: choose unprivileged ports, e.g. '20000-20999'",
           o->port_min, o->port_max);
    return -1;
  }
  /* Also false for NaN. */
  if (!(o->stop_timeout > 0 && o->stop_timeout <= 86400)) {
    dc_fmt(err, DC_ERR_MAX, "provider.stop_timeout: %g is not between 0 and 86400: give the seconds to wait after SIGTERM before SIGKILL, e.g. 10",
           o->stop_timeout);
    return -1;
  }
  if (!o->tag_prefix || !*o->tag_prefix) {
    dc_fmt(err, DC_ERR_MAX, "provider: tag_prefix is empty: pass the store's absolute path (it tags each instance's environment)");
    return -1;
  }
  for (size_t i = 0; o->env && o->env[i]; i++) {
    /* Index, not text: a malformed entry may be a pasted secret. */
    if (o->env[i][0] == '=' || !strchr(o->env[i], '=')) {
      dc_fmt(err, DC_ERR_MAX, "provider.env: entry %zu is not NAME=value", i + 1);
      return -1;
    }
  }
  return 0;
}

/* Relative log directories are taken from the current directory now, so
 * the log_path recorded in the store stays valid from anywhere. */
static char *absolute_dir(const char *dir) {
  char cwd[4096];
  if (dir[0] == '/')
    return strdup(dir);
  if (!getcwd(cwd, sizeof cwd))
    return NULL;
  return join3(cwd, "/", dir);
}

static char **copy_strv(const char *const *v) {
  size_t n = 0;
  while (v && v[n])
    n++;
  char **c = calloc(n + 1, sizeof *c);
  for (size_t i = 0; c && i < n; i++) {
    c[i] = strdup(v[i]);
    if (!c[i]) {
      free_strv(c);
      return NULL;
    }
  }
  return c;
}

static int copy_opts(process_provider *p, const provider_process_opts *o) {
  p->command = strdup(o->command);
  p->log_dir = absolute_dir(o->log_dir && *o->log_dir ? o->log_dir : DEFAULT_LOG_DIR);
  p->workdir = o->workdir && *o->workdir ? strdup(o->workdir) : NULL;
  p->tag_prefix = strdup(o->tag_prefix);
  p->env = copy_strv(o->env);
  p->port_min = o->port_min;
  p->port_max = o->port_max;
  p->stop_timeout = o->stop_timeout;
  if (!p->command || !p->log_dir || !p->tag_prefix || !p->env ||
      (o->workdir && *o->workdir && !p->workdir))
    return -1;
  return 0;
}

/* ---- prune: retention of logs, on the thread pool ---- */

typedef struct prune_work {
  uv_work_t w;
  process_provider *p;
  char *dir, *target;
  char **drop;
  size_t ndrop;
  uint64_t max_bytes;
  logprune_stats st;
  int rc;
  char err[DC_ERR_MAX];
  provider_prune_cb cb;
  void *payload;
} prune_work;

static void prune_free(prune_work *pw) {
  for (size_t i = 0; i < pw->ndrop; i++)
    free(pw->drop[i]);
  free(pw->drop);
  free(pw->dir);
  free(pw->target);
  free(pw);
}

static void prune_run(uv_work_t *w) {
  prune_work *pw = w->data;
  pw->rc = logprune_dir(pw->dir, pw->target, (const char *const *)pw->drop, pw->ndrop, pw->max_bytes, &pw->st,
                        pw->err);
}

static void prune_after(uv_work_t *w, int status) {
  prune_work *pw = w->data;
  process_provider *p = pw->p;
  p->works--;
  engine_release(p->e);
  if (!p->closing && pw->cb)
    pw->cb(pw->payload, pw->st.removed, pw->st.rotated, pw->st.freed,
           status != 0 ? "deploy: log pruning was cancelled" : pw->rc != 0 ? pw->err : NULL);
  prune_free(pw);
  if (p->closing && p->handles.next == &p->handles && p->works == 0)
    destroy(p);
}

/* Only this machine's logs: nodes are all "" for this provider. */
static int pp_prune(provider *base, const char *target, const char *const *nodes, size_t nnodes,
                    const char *const *drop, size_t ndrop, uint64_t max_bytes, provider_prune_cb cb, void *payload,
                    char *err) {
  (void)nodes;
  (void)nnodes;
  process_provider *p = (process_provider *)base;
  prune_work *pw = calloc(1, sizeof *pw);
  int ok = pw && (pw->dir = strdup(p->log_dir)) && (pw->target = strdup(target)) &&
           (ndrop == 0 || (pw->drop = calloc(ndrop, sizeof *pw->drop)));
  for (size_t i = 0; ok && i < ndrop; i++)
    ok = (pw->drop[pw->ndrop++] = strdup(drop[i])) != NULL;
  if (!ok) {
    if (pw)
      prune_free(pw);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory pruning logs");
    return -1;
  }
  pw->p = p;
  pw->max_bytes = max_bytes;
  pw->cb = cb;
  pw->payload = payload;
  pw->w.data = pw;
  int rc = uv_queue_work(p->e->loop, &pw->w, prune_run, prune_after);
  if (rc != 0) {
    prune_free(pw);
    dc_fmt(err, DC_ERR_MAX, "deploy: cannot prune logs: %s", uv_strerror(rc));
    return -1;
  }
  p->works++;
  engine_hold(p->e);
  return 0;
}

int provider_process_new(provider **out, engine *e,
                         const provider_process_opts *o, char *err) {
  *out = NULL;
  if (validate(o, err) != 0)
    return -1;
  process_provider *p = calloc(1, sizeof *p);
  if (!p || copy_opts(p, o) != 0) {
    if (p)
      destroy(p);
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory creating the process provider");
    return -1;
  }
  p->e = e;
  p->handles.next = p->handles.prev = &p->handles;
  p->base.version = PROVIDER_VERSION;
  p->base.kind = "process";
  p->base.start = pp_start;
  p->base.stop = pp_stop;
  p->base.inspect = pp_inspect;
  p->base.logs = pp_logs;
  p->base.logs_stop = pp_logs_stop;
  p->base.prune = pp_prune;
  p->base.free = pp_free;
  *out = &p->base;
  return 0;
}
