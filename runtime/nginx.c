/* The nginx router. Open-source nginx has no runtime API for upstream
 * weights, so the router owns one include file, included at http level of
 * nginx.conf, that declares the target's upstream; every apply rewrites it
 * and reloads nginx gracefully:
 *
 *   1. prepare (thread pool): read the master's pid from the pid file and
 *      check in /proc that it is an nginx master: a stale pid file must
 *      never earn some other process a SIGHUP, whose default action kills;
 *      read the include as it is, to restore it byte for byte;
 *   2. write (thread pool): the new include, atomically: a hidden temp file
 *      beside it, fsync, rename over it, fsync the directory;
 *   3. test: `nginx -T -c CONF`, spawned on the loop. -T is -t plus a dump
 *      of every file nginx read, and the dump proves CONF includes our
 *      file (-t alone passes when it does not). A refused configuration is
 *      never applied: the previous include goes back, nginx is not
 *      signalled, and apply fails with nginx's own message;
 *   4. reload: SIGHUP to the master, which starts a new generation of
 *      workers on the new configuration and asks the old ones to finish;
 *   5. confirm (see below), then, when servers left the upstream, drain.
 *
 * Confirming the reload. The include also carries a tiny server on a unix
 * socket that answers the file's generation number, and the router polls it
 * until it answers the generation just written. That proves the workers
 * serving now run our file, and not merely some configuration: a reload the
 * master refuses (a listen address in use, which -t does not see) or one
 * that raced another reload is caught, not mistaken for success. Watching
 * the master's children change alone could not tell which file the new
 * workers read. But the master sleeps 100 ms between starting the new
 * workers and stopping the old ones (ngx_master_process_cycle), and during
 * that window the old workers still accept on every listening socket; so
 * the router also waits until each worker that existed at the SIGHUP has
 * left or says "worker process is shutting down" (ngx_worker_process_cycle
 * sets that title and closes its listening sockets in one step, before it
 * handles another event). Only then does a new connection always meet the
 * new upstream.
 *
 * Draining. HAProxy drains a retired server before deleting it; here the
 * graceful reload is the drain: a server left out of the upstream gets no
 * new request from the new workers, and the old workers finish the
 * requests they have in flight to it, then exit. When an apply retires
 * servers, it ends only once the old workers are gone (or drain_timeout
 * passed: nginx's worker_shutdown_timeout is the lever for long
 * connections), so the caller may stop the retired instances.
 *
 * Keep-alive. On that graceful stop an old worker closes its idle
 * keep-alive connections at once; a client that sends its next request on
 * such a connection at that moment gets a reset, not an answer. No nginx
 * setting makes old workers finish that politely (README, "nginx": the
 * figures measured here and what avoids it). */
#include "router.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "nginx_include.h"
#include "util.h"

#define NGX_FILE_MAX (1u << 20)      /* our include: ~80 bytes a server */
#define NGX_STDERR_MAX 65536         /* nginx -T's stderr kept for errors */
#define NGX_LINE_MAX 4096            /* longest dump line we look at */
#define NGX_ANSWER_MAX 4096          /* the generation server's answer */
#define NGX_POLL_MS 20               /* generation probes, drain polling */
#define NGX_WORKER_TITLE "nginx: worker process"
#define NGX_MASTER_TITLE "nginx: master process"
#define NGX_SHUTTING_DOWN "is shutting down"

typedef struct ngx ngx;

/* ---- operations ---------------------------------------------------------- */

typedef enum {
  PH_PREPARE, PH_WRITE, PH_TEST, PH_CONFIRM, PH_DRAIN, PH_RESTORE
} phase;

typedef struct worker {   /* a process, recognised again by its start time */
  int pid;
  uint64_t start;
} worker;

typedef struct apply_op {
  struct apply_op *next;
  router_cb cb;
  void *payload;
  router_server *want;
  size_t nwant;
  route_rules routes;
  phase ph;
  int master;
  char *prev;             /* the include before this apply (NULL: none) */
  size_t prev_len;
  int prev_exists;
  char *text;             /* the include this apply writes */
  size_t text_len;
  char gen[24];           /* its generation, as the socket answers it */
  int retires;            /* a server of the previous file is left out */
  worker *old;            /* the master's workers at the SIGHUP */
  size_t nold;
  uint64_t deadline;      /* uv_now ms */
  char last[DC_ERR_MAX];  /* why the last probe did not confirm */
  char err[DC_ERR_MAX];
} apply_op;

typedef struct read_op {
  struct read_op *next;
  router_cb cb;
  void *payload;
  router_server *out;
  size_t cap;
  size_t *n;
} read_op;

/* Blocking file work, done in libuv's thread pool. The job owns what it
 * reads and writes: free may drop its operation while it runs. */
typedef enum { JOB_PREPARE, JOB_WRITE, JOB_RESTORE, JOB_READ } job_kind;

typedef struct job {
  uv_work_t req;
  struct job *next;
  ngx *n;
  job_kind kind;
  void *op;               /* NULL once free detached it */
  char *data;             /* written (WRITE, RESTORE) or read (PREPARE, READ) */
  size_t len;
  int exists;             /* the include exists, or is to exist */
  int pid;                /* PREPARE: the master */
  char err[DC_ERR_MAX];
} job;

/* One run of `nginx -T -c CONF`. */
typedef struct test_run {
  ngx *n;
  apply_op *op;           /* NULL once free detached it */
  uv_process_t proc;
  uv_pipe_t out, err;
  uv_timer_t timer;
  int handles;            /* memory goes when the last one closed */
  int exited, out_open, err_open, timed_out;
  int64_t status;
  int signal;
  char *errbuf;           /* stderr, the first NGX_STDERR_MAX bytes */
  size_t errlen;
  char chunk[65536];      /* what libuv reads into */
  char line[NGX_LINE_MAX];/* the stdout line being assembled */
  size_t linelen;
  int line_long;          /* that line is longer: skipped */
  int included;           /* the dump listed our include */
  struct stat inc;        /* the include, to recognise it by another path */
  int have_inc;
} test_run;

/* One request to the generation socket. */
typedef struct probe {
  ngx *n;
  apply_op *op;           /* NULL once free detached it */
  uv_pipe_t pipe;
  uv_timer_t timer;
  uv_connect_t conn;
  uv_write_t wr;
  char buf[NGX_ANSWER_MAX];
  size_t len;
  int finished, handles;
} probe;

struct ngx {
  router base;            /* first: a router * is an ngx * */
  engine *e;
  ngx *next_all;          /* every nginx router of the process */
  char include[PATH_MAX], conf[PATH_MAX], pidfile[PATH_MAX], bin[PATH_MAX];
  ngx_names names;        /* upstream, sockets, variables (nginx_include.h) */
  char label[PATH_MAX + 16];
  uint64_t timeout_ms, drain_ms;
  uv_timer_t tick;        /* starts the running apply, spaces its polls */
  unsigned open;          /* handles and jobs in flight; freed at 0 */
  int closing;
  apply_op *running, *queue, *queue_tail;  /* one apply at a time, FIFO */
  read_op *reads;
  job *jobs;
  test_run *test;
  probe *probe;
  char *orphan;           /* free came between write and reload: the */
  size_t orphan_len;      /* previous include, still to put back */
  int orphan_exists, orphan_due;
  int restoring;          /* ...and it is not back yet: peers wait */
};

/* Routers sharing one nginx.conf take turns: a reload reads every include,
 * so one router's untested file must never ride on another's reload. */
static ngx *all_routers;

static void apply_finish(ngx *n, apply_op *op, const char *err);
static void restore(ngx *n, apply_op *op);
static void start_next(ngx *n);
static void on_tick(uv_timer_t *timer);

/* ---- text ---------------------------------------------------------------- */

static int name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.';
}

/* Names go into nginx tokens, comments and a socket file name. */
static int valid_name(const char *s, int colon_ok) {
  size_t n = strlen(s);
  if (n == 0 || n >= NGX_NAME_MAX)
    return 0;
  for (; *s != '\0'; s++)
    if (!name_char(*s) && !(colon_ok && *s == ':'))
      return 0;
  return 1;
}

static int is_ipv6(const char *host) {
  unsigned char bin[16];
  return inet_pton(AF_INET6, host, bin) == 1;
}

/* An IP literal, or a DNS name nginx resolves when it loads the file. */
static int valid_host(const char *h) {
  if (is_ipv6(h))
    return 1;
  size_t n = strlen(h);
  if (n == 0 || n >= 64)
    return 0;
  for (; *h != '\0'; h++)
    if (!((*h >= 'a' && *h <= 'z') || (*h >= 'A' && *h <= 'Z') ||
          (*h >= '0' && *h <= '9') || *h == '.' || *h == '-'))
      return 0;
  return 1;
}

/* ---- processes (/proc: in memory, read on the loop) ---------------------- */

/* argv as the process shows it, NULs read as spaces; "" when gone. */
static void proc_title(int pid, char *buf, size_t size) {
  char path[64];
  buf[0] = '\0';
  dc_fmt(path, sizeof path, "/proc/%d/cmdline", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return;
  ssize_t r = read(fd, buf, size - 1);
  close(fd);
  if (r <= 0)
    return;
  for (ssize_t i = 0; i < r; i++)
    if (buf[i] == '\0')
      buf[i] = ' ';
  buf[r] = '\0';
  while (r > 0 && buf[r - 1] == ' ')
    buf[--r] = '\0';
}

static int starts_with(const char *s, const char *prefix) {
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

static int check_master(const ngx *n, int pid, char *err) {
  char title[256];
  proc_title(pid, title, sizeof title);
  if (title[0] == '\0') {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: no process %d, the pid in %s: nginx is not running (start "
           "it), or router.pid is not the 'pid' file of %s",
           pid, n->pidfile, n->conf);
    return DC_ERROR;
  }
  if (!starts_with(title, NGX_MASTER_TITLE)) {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: process %d, the pid in %s, is not an nginx master (it runs "
           "'%.80s'): a stale pid file? restart nginx, or fix router.pid",
           pid, n->pidfile, title);
    return DC_ERROR;
  }
  return DC_OK;
}

/* The parent pid from /proc/PID/stat; the name in field 2 may hold ')'. */
static int parent_of(const char *pid) {
  char path[64], buf[512];
  dc_fmt(path, sizeof path, "/proc/%s/stat", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return -1;
  ssize_t r = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (r <= 0)
    return -1;
  buf[r] = '\0';
  char *p = strrchr(buf, ')');
  int ppid;
  char state;
  if (p == NULL || sscanf(p + 1, " %c %d", &state, &ppid) != 2)
    return -1;
  return ppid;
}

/* The master's worker processes now, shutting down or not. */
static int list_workers(int master, worker **out, size_t *nout, char *err) {
  DIR *d = opendir("/proc");
  size_t cap = 8;
  worker *v = malloc(cap * sizeof *v);
  *out = NULL;
  *nout = 0;
  if (d == NULL || v == NULL) {
    if (d != NULL)
      closedir(d);
    free(v);
    dc_fmt(err, DC_ERR_MAX, "nginx: cannot list nginx's workers in /proc: %s",
           strerror(errno));
    return DC_ERROR;
  }
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    char title[128];
    if (de->d_name[0] < '1' || de->d_name[0] > '9' ||
        parent_of(de->d_name) != master)
      continue;
    int pid = atoi(de->d_name);
    proc_title(pid, title, sizeof title);
    if (!starts_with(title, NGX_WORKER_TITLE))
      continue;
    if (*nout == cap) {
      worker *p = realloc(v, cap * 2 * sizeof *v);
      if (p == NULL)
        break;
      v = p;
      cap *= 2;
    }
    v[*nout].pid = pid;
    v[(*nout)++].start = dc_proc_start_time(pid);
  }
  closedir(d);
  *out = v;
  return DC_OK;
}

/* A worker of the old generation that still accepts connections, or 0. */
static int old_accepting(const apply_op *op) {
  for (size_t i = 0; i < op->nold; i++) {
    char title[128];
    if (!dc_proc_alive(op->old[i].pid, op->old[i].start))
      continue;
    proc_title(op->old[i].pid, title, sizeof title);
    if (starts_with(title, NGX_WORKER_TITLE) &&
        strstr(title, NGX_SHUTTING_DOWN) == NULL)
      return op->old[i].pid;
  }
  return 0;
}

static int old_alive(const apply_op *op) {
  for (size_t i = 0; i < op->nold; i++)
    if (dc_proc_alive(op->old[i].pid, op->old[i].start))
      return op->old[i].pid;
  return 0;
}

/* ---- files (run in the thread pool) -------------------------------------- */

/* strerror may share one buffer between threads; this runs in the pool. */
static const char *os_error(int e, char *buf, size_t size) {
  return e == ENOENT ? "no such file" : strerror_r(e, buf, size);
}

static void sanitize(char *s) {
  for (; *s != '\0'; s++)
    if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
      *s = '?';
}

static int read_pid(const ngx *n, int *pid, char *err) {
  char buf[64], why[128];
  int fd = open(n->pidfile, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: cannot read the pid file %s: %s (is nginx running? "
           "router.pid must be the 'pid' file of %s)",
           n->pidfile, os_error(errno, why, sizeof why), n->conf);
    return DC_ERROR;
  }
  ssize_t r = read(fd, buf, sizeof buf - 1);
  close(fd);
  buf[r > 0 ? r : 0] = '\0';
  size_t digits = strspn(buf, "0123456789");
  size_t rest = digits + strspn(buf + digits, " \t\r\n");
  long v = digits > 0 && digits < 10 ? strtol(buf, NULL, 10) : 0;
  if (r == 0) {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: the pid file %s is empty: nginx is not running (`nginx -t` "
           "leaves an empty pid file behind); start nginx",
           n->pidfile);
    return DC_ERROR;
  }
  if (r < 0 || rest != (size_t)r || v <= 1) {
    buf[r > 32 ? 32 : (r > 0 ? r : 0)] = '\0';
    sanitize(buf);
    dc_fmt(err, DC_ERR_MAX,
           "nginx: the pid file %s holds '%s', not a process id (router.pid "
           "must be the 'pid' file of %s; restarting nginx rewrites it)",
           n->pidfile, buf, n->conf);
    return DC_ERROR;
  }
  *pid = (int)v;
  return DC_OK;
}

/* The include as it is now, NUL-terminated (data is never NULL when it
 * exists); a missing file is no error (exists = 0). */
static int read_include(const ngx *n, job *j) {
  char why[128];
  int fd = open(n->include, O_RDONLY | O_CLOEXEC);
  size_t cap = 8192;
  ssize_t r = 1;
  j->exists = fd >= 0;
  j->len = 0;
  if (fd < 0 && errno == ENOENT)
    return DC_OK;
  if (fd < 0) {
    dc_fmt(j->err, DC_ERR_MAX, "nginx: cannot read %s: %s", n->include,
           os_error(errno, why, sizeof why));
    return DC_ERROR;
  }
  j->data = malloc(cap + 1);
  while (j->data != NULL && r > 0 && j->len <= NGX_FILE_MAX) {
    if (j->len == cap) {
      char *p = realloc(j->data, cap * 2 + 1);
      if (p == NULL)
        break;
      j->data = p;
      cap *= 2;
    }
    r = read(fd, j->data + j->len, cap - j->len);
    if (r > 0)
      j->len += (size_t)r;
  }
  int e = errno;
  close(fd);
  if (j->data != NULL)
    j->data[j->len] = '\0';
  if (j->data == NULL || (r > 0 && j->len <= NGX_FILE_MAX)) {
    dc_fmt(j->err, DC_ERR_MAX, "nginx: out of memory reading %s", n->include);
  } else if (r < 0) {
    dc_fmt(j->err, DC_ERR_MAX, "nginx: cannot read %s: %s", n->include,
           os_error(e, why, sizeof why));
  } else if (j->len > NGX_FILE_MAX) {
    dc_fmt(j->err, DC_ERR_MAX,
           "nginx: %s is over 1 MiB: not a file this router wrote "
           "(router.include must be a file of its own)",
           n->include);
  } else {
    return DC_OK;
  }
  return DC_ERROR;
}

static int fsync_dir(const char *path) {
  char dir[PATH_MAX];
  dc_strlcpy(dir, path, sizeof dir);
  char *slash = strrchr(dir, '/');
  if (slash == dir)
    slash[1] = '\0';
  else if (slash != NULL)
    *slash = '\0';
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return -1;
  int rc = fsync(fd);
  close(fd);
  return rc;
}

static int write_all(int fd, const char *p, size_t len) {
  while (len > 0) {
    ssize_t w = write(fd, p, len);
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0)
      return -1;
    p += w;
    len -= (size_t)w;
  }
  return 0;
}

/* Hidden, in the include's directory (rename stays on one file system,
 * and a glob include of the directory never picks it up). */
static void temp_path(const char *include, char *out, size_t size) {
  const char *slash = strrchr(include, '/');
  dc_fmt(out, size, "%.*s.%s.deployctl-tmp", (int)(slash - include + 1),
         include, slash + 1);
}

/* Replaces the include with j->data, or removes it (j->exists == 0). */
static void put_include(const ngx *n, job *j) {
  char tmp[PATH_MAX + 32], why[128];
  struct stat st;
  const char *what = NULL, *file = tmp;
  int e = 0;
  if (!j->exists) {
    if (unlink(n->include) != 0 && errno != ENOENT)
      dc_fmt(j->err, DC_ERR_MAX, "nginx: cannot remove %s: %s", n->include,
             os_error(errno, why, sizeof why));
    return;
  }
  temp_path(n->include, tmp, sizeof tmp);
  /* nginx's master reads the file: keep the mode it had. */
  mode_t mode = stat(n->include, &st) == 0 ? (st.st_mode & 07777) : 0644;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) {
    what = "create";
    e = errno;
  } else {
    if (write_all(fd, j->data, j->len) != 0 || fsync(fd) != 0) {
      what = "write";
      e = errno;
    }
    if (close(fd) != 0 && what == NULL) {
      what = "write";
      e = errno;
    }
  }
  if (what == NULL && rename(tmp, n->include) != 0) {
    what = "rename over the include";
    e = errno;
  }
  if (what == NULL && fsync_dir(n->include) != 0) {
    what = "sync the directory of"; /* renamed already: the include */
    file = n->include;
    e = errno;
  }
  if (what == NULL)
    return;
  if (file == tmp)
    unlink(tmp);
  dc_fmt(j->err, DC_ERR_MAX,
         "nginx: cannot %s %s: %s (deployctl must be able to write "
         "router.include's directory)",
         what, file, os_error(e, why, sizeof why));
}

static void job_work(uv_work_t *req) {
  job *j = req->data;
  const ngx *n = j->n;
  switch (j->kind) {
  case JOB_PREPARE:
    if (read_pid(n, &j->pid, j->err) == DC_OK &&
        check_master(n, j->pid, j->err) == DC_OK)
      read_include(n, j);
    break;
  case JOB_READ:
    read_include(n, j);
    break;
  case JOB_WRITE:
  case JOB_RESTORE:
    put_include(n, j);
    break;
  }
}

static void unlink_router(ngx *n);

static void ngx_release(ngx *n) {
  if (n->closing && n->open == 0) {
    unlink_router(n);
    free(n->orphan);
    free(n);
  }
}

static void job_unlink(ngx *n, job *j) {
  job **pp = &n->jobs;
  while (*pp != NULL && *pp != j)
    pp = &(*pp)->next;
  if (*pp == j)
    *pp = j->next;
}

static void job_free(job *j) {
  free(j->data);
  free(j);
}

static void orphan_restore(ngx *n);
static void kick_peers(const ngx *n);
static void on_prepared(ngx *n, apply_op *op, job *j);
static void on_written(ngx *n, apply_op *op, job *j);
static void on_restored(ngx *n, apply_op *op, job *j);
static void on_read(ngx *n, read_op *op, job *j);

static void job_done(uv_work_t *req, int status) {
  job *j = req->data;
  ngx *n = j->n;
  job_unlink(n, j);
  n->open--;
  if (status != 0 && j->err[0] == '\0')
    dc_fmt(j->err, DC_ERR_MAX, "nginx: file work cancelled: %s",
           uv_strerror(status));
  if (j->op != NULL) {
    switch (j->kind) {
    case JOB_PREPARE: on_prepared(n, j->op, j); break;
    case JOB_WRITE: on_written(n, j->op, j); break;
    case JOB_RESTORE: on_restored(n, j->op, j); break;
    case JOB_READ: on_read(n, j->op, j); break;
    }
  } else if (j->kind == JOB_WRITE && n->orphan_due) {
    orphan_restore(n);   /* free came while this write ran */
  } else if (j->kind == JOB_RESTORE && n->restoring) {
    n->restoring = 0;    /* the orphan is back: peers may reload */
    kick_peers(n);
  }
  job_free(j);
  ngx_release(n);
}

/* Queues blocking work; data (owned by the job from now on) is what it
 * writes. -1 only when out of memory or refused (err filled). */
static int job_start(ngx *n, job_kind kind, void *op, char *data, size_t len,
                     int exists, char *err) {
  job *j = calloc(1, sizeof *j);
  if (j == NULL) {
    free(data);
    dc_fmt(err, DC_ERR_MAX, "nginx: out of memory");
    return DC_ERROR;
  }
  j->n = n;
  j->kind = kind;
  j->op = op;
  j->data = data;
  j->len = len;
  j->exists = exists;
  j->req.data = j;
  int rc = uv_queue_work(n->e->loop, &j->req, job_work, job_done);
  if (rc < 0) {
    dc_fmt(err, DC_ERR_MAX, "nginx: cannot queue file work: %s",
           uv_strerror(rc));
    job_free(j);
    return DC_ERROR;
  }
  j->next = n->jobs;
  n->jobs = j;
  n->open++;
  return DC_OK;
}

static char *dup_bytes(const char *p, size_t len) {
  char *d = malloc(len + 1);
  if (d != NULL) {
    if (len > 0)
      memcpy(d, p, len);
    d[len] = '\0';
  }
  return d;
}

/* ---- nginx -T ------------------------------------------------------------ */

static void test_handle_closed(uv_handle_t *h) {
  test_run *t = h->data;
  ngx *n = t->n;
  n->open--;
  if (--t->handles == 0) {
    free(t->errbuf);
    free(t);
  }
  ngx_release(n);
}

static void test_close(test_run *t) {
  if (t->n->test == t)
    t->n->test = NULL;
  uv_close((uv_handle_t *)&t->timer, test_handle_closed);
  uv_close((uv_handle_t *)&t->out, test_handle_closed);
  uv_close((uv_handle_t *)&t->err, test_handle_closed);
  uv_close((uv_handle_t *)&t->proc, test_handle_closed);
}

/* A line of the dump; "# configuration file PATH:" names a file read. */
static void dump_line(test_run *t, const char *line) {
  static const char key[] = "# configuration file ";
  size_t l = strlen(line);
  if (t->included || strncmp(line, key, sizeof key - 1) != 0 || l < 2 ||
      line[l - 1] != ':')
    return;
  char path[NGX_LINE_MAX];
  dc_fmt(path, sizeof path, "%.*s", (int)(l - sizeof key), line + sizeof key - 1);
  struct stat st;
  if (strcmp(path, t->n->include) == 0)
    t->included = 1;
  else if (t->have_inc && stat(path, &st) == 0 && st.st_dev == t->inc.st_dev &&
           st.st_ino == t->inc.st_ino)
    t->included = 1;   /* the same file by another path (a symlink) */
}

static void test_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  test_run *t = h->data;
  *buf = uv_buf_init(t->chunk, sizeof t->chunk);
}

static void test_finish(test_run *t);

static void test_on_out(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  test_run *t = s->data;
  if (nread < 0) {
    t->out_open = 0;
    uv_read_stop(s);
    test_finish(t);
    return;
  }
  for (ssize_t i = 0; i < nread; i++) {
    char c = buf->base[i];
    if (c == '\n') {
      t->line[t->linelen] = '\0';
      if (!t->line_long)
        dump_line(t, t->line);
      t->linelen = 0;
      t->line_long = 0;
    } else if (t->linelen < sizeof t->line - 1) {
      t->line[t->linelen++] = c;
    } else {
      t->line_long = 1;
    }
  }
}

static void test_on_err(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  test_run *t = s->data;
  if (nread < 0) {
    t->err_open = 0;
    uv_read_stop(s);
    test_finish(t);
    return;
  }
  size_t room = NGX_STDERR_MAX - t->errlen;
  size_t take = (size_t)nread < room ? (size_t)nread : room;
  if (t->errbuf != NULL && take > 0) {
    memcpy(t->errbuf + t->errlen, buf->base, take);
    t->errlen += take;
    t->errbuf[t->errlen] = '\0';
  }
}

static void test_on_exit(uv_process_t *p, int64_t status, int sig) {
  test_run *t = p->data;
  t->exited = 1;
  t->status = status;
  t->signal = sig;
  test_finish(t);
}

static void test_on_timeout(uv_timer_t *timer) {
  test_run *t = timer->data;
  t->timed_out = 1;
  uv_process_kill(&t->proc, SIGKILL);
}

/* nginx's stderr as one line: its "[level] text" messages without the
 * time and pid before them, and without the "syntax is ok" chatter. */
static void nginx_message(const char *text, char *out, size_t size) {
  size_t len = 0;
  out[0] = '\0';
  for (const char *next = text; *next != '\0';) {
    const char *nl = strchr(next, '\n');
    size_t l = nl != NULL ? (size_t)(nl - next) : strlen(next);
    char line[1024];
    dc_fmt(line, sizeof line, "%.*s", (int)l, next);
    next += nl != NULL ? l + 1 : l;
    char *lv = strchr(line, '[');
    char *close = lv != NULL ? strchr(lv, ']') : NULL;
    if (close == NULL || strstr(line, "syntax is ok") != NULL ||
        strstr(line, "test is successful") != NULL)
      continue;
    close[1] = '\0';
    char *msg = close + 2;
    size_t digits = strspn(msg, "0123456789#");
    if (digits > 0 && msg[digits] == ':')   /* "123#123: " */
      msg += digits + 1;
    while (*msg == ' ')
      msg++;
    int w = snprintf(out + len, size - len, "%s%s %s", len ? "; " : "", lv,
                     msg);
    if (w < 0 || (size_t)w >= size - len)
      break;
    len += (size_t)w;
  }
  if (len == 0) {   /* no [level] line: what nginx said, as it is */
    dc_strlcpy(out, text, size);
    size_t n = strlen(out);
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' '))
      out[--n] = '\0';
  }
}

static void on_tested(ngx *n, apply_op *op, test_run *t);

static void test_finish(test_run *t) {
  if (!t->exited || t->out_open || t->err_open)
    return;
  apply_op *op = t->op;
  ngx *n = t->n;
  test_close(t);
  if (op != NULL)
    on_tested(n, op, t);
}

static void test_start(ngx *n, apply_op *op) {
  test_run *t = calloc(1, sizeof *t);
  char *errbuf = malloc(NGX_STDERR_MAX + 1);
  if (t == NULL || errbuf == NULL) {
    free(t);
    free(errbuf);
    dc_fmt(op->err, DC_ERR_MAX, "nginx: out of memory");
    restore(n, op);
    return;
  }
  errbuf[0] = '\0';
  t->n = n;
  t->op = op;
  t->errbuf = errbuf;
  t->have_inc = stat(n->include, &t->inc) == 0;
  uv_pipe_init(n->e->loop, &t->out, 0);
  uv_pipe_init(n->e->loop, &t->err, 0);
  uv_timer_init(n->e->loop, &t->timer);
  t->proc.data = t->out.data = t->err.data = t->timer.data = t;
  char *args[] = {n->bin, "-T", "-c", n->conf, NULL};
  uv_stdio_container_t stdio[3] = {
      {.flags = UV_IGNORE},
      {.flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE, .data.stream = (uv_stream_t *)&t->out},
      {.flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE, .data.stream = (uv_stream_t *)&t->err},
  };
  uv_process_options_t o = {.exit_cb = test_on_exit, .file = n->bin,
                            .args = args, .stdio_count = 3, .stdio = stdio};
  int rc = uv_spawn(n->e->loop, &t->proc, &o);
  /* Even a failed uv_spawn leaves an initialized handle to close. */
  t->handles = 4;
  n->open += 4;
  n->test = t;
  if (rc < 0) {
    dc_fmt(op->err, DC_ERR_MAX,
           "nginx: cannot run %s: %s (set router.nginx to the nginx binary); "
           "nothing applied: %s restored, nginx not signalled",
           n->bin, uv_strerror(rc), n->include);
    t->op = NULL;
    test_close(t);
    restore(n, op);
    return;
  }
  t->out_open = t->err_open = 1;
  uv_read_start((uv_stream_t *)&t->out, test_alloc, test_on_out);
  uv_read_start((uv_stream_t *)&t->err, test_alloc, test_on_err);
  uv_timer_start(&t->timer, test_on_timeout, n->timeout_ms, 0);
}

/* ---- the generation probe ------------------------------------------------ */

static void probe_handle_closed(uv_handle_t *h) {
  probe *p = h->data;
  ngx *n = p->n;
  n->open--;
  if (--p->handles == 0)
    free(p);
  ngx_release(n);
}

static void probe_close(probe *p) {
  p->finished = 1;
  if (p->n->probe == p)
    p->n->probe = NULL;
  uv_close((uv_handle_t *)&p->timer, probe_handle_closed);
  uv_close((uv_handle_t *)&p->pipe, probe_handle_closed);
}

static void on_probed(ngx *n, apply_op *op, const char *err, char *answer);

/* err: why there is no answer; else answer is the body. */
static void probe_finish(probe *p, const char *err, char *answer) {
  if (p->finished)
    return;
  probe_close(p);
  if (p->op != NULL)
    on_probed(p->n, p->op, err, answer);
}

static void probe_fail(probe *p, const char *what, int status) {
  char err[DC_ERR_MAX];
  dc_fmt(err, DC_ERR_MAX, "%s %s: %s", what, p->n->names.sock,
         status == UV_ENOENT ? "no such socket" : uv_strerror(status));
  probe_finish(p, err, NULL);
}

static void probe_on_timeout(uv_timer_t *t) {
  probe_fail(t->data, "no answer from", UV_ETIMEDOUT);
}

static void probe_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  probe *p = h->data;
  *buf = uv_buf_init(p->buf + p->len, (unsigned)(sizeof p->buf - 1 - p->len));
}

static void probe_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  probe *p = s->data;
  char err[DC_ERR_MAX];
  if (p->finished)
    return;
  if (nread > 0) {
    p->len += (size_t)nread;
    if (p->len < sizeof p->buf - 1)
      return;
  } else if (nread != UV_EOF) {
    if (nread < 0)
      probe_fail(p, "reading from", (int)nread);
    return;
  }
  p->buf[p->len] = '\0';
  char *body = strstr(p->buf, "\r\n\r\n");
  if (strncmp(p->buf, "HTTP/1.", 7) != 0 || strncmp(p->buf + 8, " 200 ", 5) != 0 ||
      body == NULL) {
    char *nl = strchr(p->buf, '\r');
    if (nl != NULL)
      *nl = '\0';
    sanitize(p->buf);
    dc_fmt(err, DC_ERR_MAX, "%s answered '%.80s', not a generation", p->n->names.sock,
           p->buf);
    probe_finish(p, err, NULL);
    return;
  }
  probe_finish(p, NULL, body + 4);
}

static void probe_on_write(uv_write_t *req, int status) {
  probe *p = req->data;
  if (!p->finished && status < 0)
    probe_fail(p, "writing to", status);
}

static void probe_on_connect(uv_connect_t *req, int status) {
  static char request[] = "GET / HTTP/1.0\r\nHost: deployctl\r\n\r\n";
  probe *p = req->data;
  if (p->finished)
    return;
  if (status < 0) {
    probe_fail(p, "cannot connect to", status);
    return;
  }
  uv_buf_t b = uv_buf_init(request, sizeof request - 1);
  int rc = uv_write(&p->wr, (uv_stream_t *)&p->pipe, &b, 1, probe_on_write);
  if (rc == 0)
    rc = uv_read_start((uv_stream_t *)&p->pipe, probe_alloc, probe_on_read);
  if (rc < 0)
    probe_fail(p, "writing to", rc);
}

static void probe_start(ngx *n, apply_op *op) {
  probe *p = calloc(1, sizeof *p);
  if (p == NULL) {
    dc_fmt(op->err, DC_ERR_MAX, "nginx: out of memory");
    restore(n, op);
    return;
  }
  p->n = n;
  p->op = op;
  uv_pipe_init(n->e->loop, &p->pipe, 0);
  uv_timer_init(n->e->loop, &p->timer);
  p->pipe.data = p->timer.data = p->conn.data = p->wr.data = p;
  p->handles = 2;
  n->open += 2;
  n->probe = p;
  /* A probe started just before the deadline still gets time to answer,
   * so that the last word is nginx's, not our own impatience. */
  uint64_t now = uv_now(n->e->loop);
  uint64_t left = op->deadline > now ? op->deadline - now : 0;
  left = left < 250 ? 250 : (left > 1000 ? 1000 : left);
  uv_timer_start(&p->timer, probe_on_timeout, left, 0);
  uv_pipe_connect(&p->conn, &p->pipe, n->names.sock, probe_on_connect);
}

/* ---- apply: the steps ---------------------------------------------------- */

static int is_wanted(const apply_op *op, const char *name) {
  for (size_t i = 0; i < op->nwant; i++)
    if (strcmp(op->want[i].name, name) == 0)
      return 1;
  return 0;
}

/* One more than the generation of the file it replaces; a file without
 * one (not ours) gets the time in ms, which no earlier file can carry. */
static void next_gen(const apply_op *op, char *gen, size_t size) {
  char prev[24] = "";
  if (op->prev_exists)
    nginx_include_generation(op->prev, op->prev_len, prev, sizeof prev);
  unsigned long long g = prev[0] ? strtoull(prev, NULL, 10) + 1
                                 : (unsigned long long)(dc_wall_now() * 1000);
  dc_fmt(gen, size, "%llu", g);
}

static void on_prepared(ngx *n, apply_op *op, job *j) {
  router_server *prev;
  size_t nprev;
  if (j->err[0]) {
    apply_finish(n, op, j->err);
    return;
  }
  op->master = j->pid;
  op->prev_exists = j->exists;
  op->prev = j->data;   /* taken from the job */
  op->prev_len = j->len;
  j->data = NULL;
  next_gen(op, op->gen, sizeof op->gen);
  op->text = nginx_include_render(&n->names, op->gen, op->want, op->nwant, &op->routes, 0, &op->text_len);
  if (op->text == NULL || nginx_include_servers(op->prev ? op->prev : "", op->prev_len,
                                                &prev, &nprev) < 0) {
    apply_finish(n, op, "nginx: out of memory");
    return;
  }
  for (size_t i = 0; i < nprev; i++)
    op->retires |= !is_wanted(op, prev[i].name);
  free(prev);
  op->ph = PH_WRITE;
  char *copy = dup_bytes(op->text, op->text_len);
  if (copy == NULL || job_start(n, JOB_WRITE, op, copy, op->text_len, 1,
                                op->err) < 0)
    apply_finish(n, op, "nginx: out of memory");
}

static void on_written(ngx *n, apply_op *op, job *j) {
  if (j->err[0]) {
    /* The rename is the last step that can leave the old file in place;
     * restoring is harmless either way. */
    dc_strlcpy(op->err, j->err, sizeof op->err);
    restore(n, op);
    return;
  }
  op->ph = PH_TEST;
  test_start(n, op);
}

static void reload(ngx *n, apply_op *op) {
  if (check_master(n, op->master, op->err) < 0 ||
      list_workers(op->master, &op->old, &op->nold, op->err) < 0) {
    size_t l = strlen(op->err);
    dc_fmt(op->err + l, sizeof op->err - l,
           "; nothing applied: %s restored, nginx not signalled", n->include);
    restore(n, op);
    return;
  }
  if (kill(op->master, SIGHUP) != 0) {
    dc_fmt(op->err, DC_ERR_MAX,
           "nginx: cannot signal the master (pid %d): %s (deployctl must run "
           "as the user of the nginx master, usually root); %s restored",
           op->master, strerror(errno), n->include);
    restore(n, op);
    return;
  }
  op->ph = PH_CONFIRM;
  op->deadline = uv_now(n->e->loop) + n->timeout_ms;
  probe_start(n, op);
}

static void on_tested(ngx *n, apply_op *op, test_run *t) {
  char msg[DC_ERR_MAX];
  if (t->timed_out) {
    dc_fmt(op->err, DC_ERR_MAX,
           "nginx: '%s -T -c %s' did not finish within %.3g s; nothing "
           "applied: %s restored, nginx not signalled",
           n->bin, n->conf, (double)n->timeout_ms / 1000.0, n->include);
  } else if (t->status != 0 || t->signal != 0) {
    nginx_message(t->errbuf, msg, sizeof msg);
    dc_fmt(op->err, DC_ERR_MAX,
           "nginx: the configuration was refused, nothing applied (%s "
           "restored, nginx not signalled): %s",
           n->include, msg[0] ? msg : "nginx -T failed without a message");
  } else if (!t->included) {
    dc_fmt(op->err, DC_ERR_MAX,
           "nginx: %s does not include %s (nginx -T lists every file it "
           "reads): add 'include %s;' inside its http block; nothing "
           "applied: %s restored, nginx not signalled",
           n->conf, n->include, n->include, n->include);
  } else {
    reload(n, op);
    return;
  }
  restore(n, op);
}

static void drain_check(ngx *n, apply_op *op) {
  if (old_alive(op) == 0 || uv_now(n->e->loop) >= op->deadline)
    apply_finish(n, op, NULL);  /* past the deadline: nginx's own
                                 * worker_shutdown_timeout governs */
  else
    uv_timer_start(&n->tick, on_tick, NGX_POLL_MS, 0);
}

static void on_probed(ngx *n, apply_op *op, const char *err, char *answer) {
  int busy = 0;
  if (err != NULL) {
    dc_strlcpy(op->last, err, sizeof op->last);
  } else if (strcmp(answer, op->gen) != 0) {
    sanitize(answer);
    dc_fmt(op->last, sizeof op->last, "%s answered generation '%.30s'",
           n->names.sock, answer);
  } else if ((busy = old_accepting(op)) != 0) {
    dc_fmt(op->last, sizeof op->last,
           "worker %d of the previous generation still accepts connections",
           busy);
  } else if (op->retires && n->drain_ms > 0) {
    op->ph = PH_DRAIN;
    op->deadline = uv_now(n->e->loop) + n->drain_ms;
    drain_check(n, op);
    return;
  } else {
    apply_finish(n, op, NULL);
    return;
  }
  if (uv_now(n->e->loop) < op->deadline) {
    uv_timer_start(&n->tick, on_tick, NGX_POLL_MS, 0);
    return;
  }
  dc_fmt(op->err, DC_ERR_MAX,
         "nginx: the reload did not take within %.3g s (%s): nginx -t "
         "passed, so its master refused the file (see nginx's error log: a "
         "listen address in use?) or %s is not the pid file of the nginx "
         "running %s; %s restored",
         (double)n->timeout_ms / 1000.0, op->last, n->pidfile, n->conf,
         n->include);
  restore(n, op);
}

/* The previous include back, byte for byte, then the apply fails with
 * op->err. */
static void restore(ngx *n, apply_op *op) {
  char err[DC_ERR_MAX];
  op->ph = PH_RESTORE;
  char *copy = dup_bytes(op->prev ? op->prev : "", op->prev_len);
  if (copy == NULL ||
      job_start(n, JOB_RESTORE, op, copy, op->prev_len, op->prev_exists,
                err) < 0)
    apply_finish(n, op, op->err);
}

static void on_restored(ngx *n, apply_op *op, job *j) {
  if (j->err[0]) {
    size_t l = strlen(op->err);
    dc_fmt(op->err + l, sizeof op->err - l, "; and restoring failed: %s",
           j->err);
  }
  apply_finish(n, op, op->err);
}

/* The running apply's timer: its first move, and every pause after. */
static void on_tick(uv_timer_t *timer) {
  ngx *n = timer->data;
  apply_op *op = n->running;
  if (op == NULL || n->closing)
    return;
  switch (op->ph) {
  case PH_PREPARE:
    if (job_start(n, JOB_PREPARE, op, NULL, 0, 0, op->err) < 0)
      apply_finish(n, op, op->err);
    break;
  case PH_CONFIRM:
    probe_start(n, op);
    break;
  case PH_DRAIN:
    drain_check(n, op);
    break;
  default:
    break;
  }
}

/* ---- apply: queue -------------------------------------------------------- */

static void apply_op_free(apply_op *op) {
  free(op->want);
  free(op->prev);
  free(op->text);
  free(op->old);
  free(op);
}

static int conf_busy(const ngx *n) {
  for (const ngx *m = all_routers; m != NULL; m = m->next_all)
    if (m != n && (m->running != NULL || m->restoring) &&
        strcmp(m->conf, n->conf) == 0)
      return 1;
  return 0;
}

/* Routers waiting for this conf get their turn, before n takes another. */
static void kick_peers(const ngx *n) {
  for (ngx *m = all_routers; m != NULL; m = m->next_all)
    if (m != n && m->running == NULL && m->queue != NULL &&
        strcmp(m->conf, n->conf) == 0)
      start_next(m);
}

static void start_next(ngx *n) {
  if (n->running != NULL || n->queue == NULL || n->closing || conf_busy(n))
    return;
  n->running = n->queue;
  n->queue = n->queue->next;
  if (n->queue == NULL)
    n->queue_tail = NULL;
  /* Through the loop, so cb never runs inside apply. */
  uv_timer_start(&n->tick, on_tick, 0, 0);
}

/* The end of the running apply: cb once, then whoever waits. */
static void apply_finish(ngx *n, apply_op *op, const char *err) {
  n->running = NULL;
  uv_timer_stop(&n->tick);
  op->cb(op->payload, err);
  apply_op_free(op);
  kick_peers(n);
  start_next(n);
}

static int check_server(const router_server *s, char *err) {
  if (!valid_name(s->name, 1)) {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: server name '%s' must be 1 to 63 letters, digits, '_', "
           "'-', '.', ':' (it is kept in a comment of the include)",
           s->name);
    return DC_ERROR;
  }
  if (!valid_host(s->host)) {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: server %s: host '%s' is neither an IP address nor a host "
           "name (letters, digits, '.', '-')",
           s->name, s->host);
    return DC_ERROR;
  }
  if (s->port < 1 || s->port > 65535 || s->weight < 0 || s->weight > 256) {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: server %s: port %d or weight %d out of range (port "
           "1..65535, weight 0..256)",
           s->name, s->port, s->weight);
    return DC_ERROR;
  }
  return DC_OK;
}

static int check_servers(const router_server *servers, size_t n, char *err) {
  for (size_t i = 0; i < n; i++) {
    if (check_server(&servers[i], err) < 0)
      return DC_ERROR;
    for (size_t j = 0; j < i; j++) {
      if (strcmp(servers[i].name, servers[j].name) == 0) {
        dc_fmt(err, DC_ERR_MAX,
               "nginx: server %s is listed twice (names must be unique)",
               servers[i].name);
        return DC_ERROR;
      }
    }
  }
  return DC_OK;
}

/* nginx reports which server answered as the address it reached: a
 * sticky cookie is handed out by address, so fresh servers need one. */
static int check_sticky(const router_plan *plan, char *err) {
  unsigned char bin[16];
  if (!routes_affinity_active(&plan->routes))
    return DC_OK;
  for (size_t i = 0; i < plan->n; i++) {
    const router_server *s = &plan->servers[i];
    if (s->fresh && inet_pton(AF_INET, s->host, bin) != 1 && inet_pton(AF_INET6, s->host, bin) != 1) {
      dc_fmt(err, DC_ERR_MAX,
             "nginx: sticky canaries need servers given by IP address (nginx names the server that answered by "
             "its address): server %s is '%s'",
             s->name, s->host);
      return DC_ERROR;
    }
  }
  return DC_OK;
}

static int ngx_apply(router *r, const router_plan *plan, router_cb cb,
                     void *payload, char *err) {
  ngx *x = (ngx *)r;
  const router_server *servers = plan->servers;
  size_t n = plan->n;
  if (x->closing) {
    dc_fmt(err, DC_ERR_MAX, "nginx: router used after free");
    return DC_ERROR;
  }
  if (check_servers(servers, n, err) < 0 || check_sticky(plan, err) < 0)
    return DC_ERROR;
  apply_op *op = calloc(1, sizeof *op);
  router_server *want = calloc(n ? n : 1, sizeof *want);
  if (op == NULL || want == NULL) {
    free(op);
    free(want);
    dc_fmt(err, DC_ERR_MAX, "nginx: out of memory");
    return DC_ERROR;
  }
  if (n > 0)
    memcpy(want, servers, n * sizeof *want);
  op->want = want;
  op->nwant = n;
  op->routes = plan->routes;
  op->cb = cb;
  op->payload = payload;
  op->ph = PH_PREPARE;
  if (x->queue_tail != NULL)
    x->queue_tail->next = op;
  else
    x->queue = op;
  x->queue_tail = op;
  start_next(x);
  return DC_OK;
}

/* ---- read ---------------------------------------------------------------- */

static void read_unlink(ngx *n, read_op *op) {
  read_op **pp = &n->reads;
  while (*pp != NULL && *pp != op)
    pp = &(*pp)->next;
  if (*pp == op)
    *pp = op->next;
}

static void on_read(ngx *n, read_op *op, job *j) {
  char msg[DC_ERR_MAX];
  const char *err = j->err[0] ? j->err : NULL;
  router_server *v = NULL;
  size_t nv = 0;
  read_unlink(n, op);
  if (err == NULL && !j->exists) {
    dc_fmt(msg, sizeof msg,
           "nginx: %s does not exist (create it as README's nginx section "
           "shows; nginx.conf includes it)",
           n->include);
    err = msg;
  } else if (err == NULL) {
    route_rules routes;
    if (nginx_include_parse(&n->names, j->data, j->len, &v, &nv, &routes, msg) < 0)
      err = msg;
  }
  for (size_t i = 0; err == NULL && i < nv && i < op->cap; i++) {
    op->out[i] = v[i];
    *op->n = i + 1;
  }
  free(v);
  op->cb(op->payload, err);
  free(op);
}

static int ngx_read(router *r, router_server *out, size_t cap, size_t *n,
                    router_cb cb, void *payload, char *err) {
  ngx *x = (ngx *)r;
  *n = 0;
  if (x->closing) {
    dc_fmt(err, DC_ERR_MAX, "nginx: router used after free");
    return DC_ERROR;
  }
  read_op *op = calloc(1, sizeof *op);
  if (op == NULL) {
    dc_fmt(err, DC_ERR_MAX, "nginx: out of memory");
    return DC_ERROR;
  }
  op->cb = cb;
  op->payload = payload;
  op->out = out;
  op->cap = cap;
  op->n = n;
  if (job_start(x, JOB_READ, op, NULL, 0, 0, err) < 0) {
    free(op);
    return DC_ERROR;
  }
  op->next = x->reads;
  x->reads = op;
  return DC_OK;
}

/* ---- life cycle ---------------------------------------------------------- */

static void tick_closed(uv_handle_t *h) {
  ngx *n = h->data;
  n->open--;
  ngx_release(n);
}

/* free came after the new include was written and before nginx was
 * signalled: nobody tested it, so the previous one goes back. */
static void orphan_restore(ngx *n) {
  char err[DC_ERR_MAX];
  n->orphan_due = 0;
  char *data = n->orphan;
  n->orphan = NULL;
  if (job_start(n, JOB_RESTORE, NULL, data ? data : dup_bytes("", 0),
                n->orphan_len, n->orphan_exists, err) < 0) {
    n->restoring = 0;   /* out of memory: nothing more can be done */
    kick_peers(n);
  }
}

static void unlink_router(ngx *n) {
  ngx **pp = &all_routers;
  while (*pp != NULL && *pp != n)
    pp = &(*pp)->next_all;
  if (*pp == n)
    *pp = n->next_all;
}

static const char ngx_closed_msg[] = "nginx: router closed";

/* Every operation still pending is told "router closed" before free
 * returns; work in flight is detached; the memory goes once the loop has
 * closed every handle and the thread pool returned every job. */
static void ngx_free(router *r) {
  ngx *n = (ngx *)r;
  if (n == NULL || n->closing)
    return;
  n->closing = 1;
  for (job *j = n->jobs; j != NULL; j = j->next)
    j->op = NULL;
  if (n->probe != NULL) {
    n->probe->op = NULL;
    probe_close(n->probe);
  }
  apply_op *op = n->running;
  if (op != NULL && (op->ph == PH_WRITE || op->ph == PH_TEST)) {
    n->orphan = op->prev;
    n->orphan_len = op->prev_len;
    n->orphan_exists = op->prev_exists;
    n->orphan_due = 1;
    n->restoring = 1;
    op->prev = NULL;
  }
  if (n->test != NULL) {
    n->test->op = NULL;
    uv_process_kill(&n->test->proc, SIGKILL);
  }
  if (op != NULL && op->ph == PH_TEST)
    orphan_restore(n);  /* no write in flight: restore now */
  uv_close((uv_handle_t *)&n->tick, tick_closed);
  if (op != NULL)
    op->next = n->queue;
  else
    op = n->queue;
  n->running = n->queue = n->queue_tail = NULL;
  read_op *reads = n->reads;
  n->reads = NULL;
  kick_peers(n);
  while (op != NULL) {
    apply_op *next = op->next;
    op->cb(op->payload, ngx_closed_msg);
    apply_op_free(op);
    op = next;
  }
  while (reads != NULL) {
    read_op *next = reads->next;
    reads->cb(reads->payload, ngx_closed_msg);
    free(reads);
    reads = next;
  }
}

static int check_path(const char *field, const char *v, char *out,
                      size_t size, char *err) {
  if (v == NULL || v[0] != '/' || strlen(v) >= size) {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: router.%s '%s' must be an absolute path (nginx resolves "
           "relative ones against its own prefix, not deployctl's directory)",
           field, v ? v : "");
    return DC_ERROR;
  }
  dc_strlcpy(out, v, size);
  return DC_OK;
}

static int ngx_check_opts(ngx *n, const router_nginx_opts *o, char *err) {
  if (o == NULL) {
    dc_fmt(err, DC_ERR_MAX, "nginx: no router options given");
    return DC_ERROR;
  }
  if (check_path("include", o->include, n->include, sizeof n->include, err) < 0 ||
      check_path("conf", o->conf, n->conf, sizeof n->conf, err) < 0 ||
      check_path("pid", o->pid, n->pidfile, sizeof n->pidfile, err) < 0)
    return DC_ERROR;
  if (o->upstream == NULL || !valid_name(o->upstream, 0)) {
    dc_fmt(err, DC_ERR_MAX,
           "nginx: upstream name '%s' is not valid (1 to 63 letters, digits, "
           "'_', '-', '.': the name nginx.conf's proxy_pass uses)",
           o->upstream ? o->upstream : "");
    return DC_ERROR;
  }
  const char *bin = o->nginx != NULL && o->nginx[0] ? o->nginx : "/usr/sbin/nginx";
  if (strlen(bin) >= sizeof n->bin) {
    dc_fmt(err, DC_ERR_MAX, "nginx: router.nginx '%s' is too long", bin);
    return DC_ERROR;
  }
  dc_strlcpy(n->bin, bin, sizeof n->bin);
  char dir[PATH_MAX];
  const char *slash = strrchr(n->include, '/');
  dc_fmt(dir, sizeof dir, "%.*s", (int)(slash - n->include), n->include);
  if (nginx_include_names(&n->names, dir, o->upstream, err) < 0)
    return DC_ERROR;
  n->names.path = n->include;
  dc_fmt(n->label, sizeof n->label, "nginx %s", n->include);
  return DC_OK;
}

static uint64_t seconds_ms(double s, double dflt) {
  return (uint64_t)((s > 0 ? s : dflt) * 1000.0 + 0.5);
}

int router_nginx_new(router **out, engine *e, const router_nginx_opts *o,
                     char *err) {
  *out = NULL;
  ngx *n = calloc(1, sizeof *n);
  if (n == NULL) {
    dc_fmt(err, DC_ERR_MAX, "nginx: out of memory");
    return DC_ERROR;
  }
  if (ngx_check_opts(n, o, err) < 0) {
    free(n);
    return DC_ERROR;
  }
  n->e = e;
  n->timeout_ms = seconds_ms(o->timeout, 10);
  n->drain_ms = seconds_ms(o->drain_timeout, 30);
  uv_timer_init(e->loop, &n->tick);
  n->tick.data = n;
  n->open = 1;
  n->base.version = ROUTER_VERSION;
  n->base.kind = "nginx";
  n->base.label = n->label;
  n->base.can_route = 1;
  n->base.apply = ngx_apply;
  n->base.read = ngx_read;
  n->base.free = ngx_free;
  n->next_all = all_routers;
  all_routers = n;
  *out = &n->base;
  return DC_OK;
}

/* ---- fuzzing ------------------------------------------------------------- */

#ifdef DEPLOY_FUZZ
/* As in haproxy.c: an entry point compiled only for fuzz/nginx.c, so the
 * readers stay static and where they are. */
int nginx_fuzz_include(const char *upstream, const char *sock, const char *text, size_t len,
                       router_server **out, size_t *nout, char *err) {
  /* the names of the include whose generation socket is sock */
  char dir[NGX_SOCK_MAX];
  ngx_names nm;
  route_rules routes;
  dc_strlcpy(dir, sock, sizeof dir);
  char *slash = strrchr(dir, '/');
  if (slash != NULL)
    *slash = '\0';
  *out = NULL;
  *nout = 0;
  if (nginx_include_names(&nm, dir, upstream, err) < 0)
    return DC_ERROR;
  nm.path = "(fuzz input)";
  return nginx_include_parse(&nm, text, len, out, nout, &routes, err);
}

void nginx_fuzz_message(const char *text, char *out, size_t size) { nginx_message(text, out, size); }
#endif
