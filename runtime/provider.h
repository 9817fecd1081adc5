/* Providers start, stop, inspect and read the logs of the instances of a
 * version, on the machine deployctl runs on (process.c) or on other hosts
 * (ssh). Every call is asynchronous: its callback runs exactly once, later,
 * from the loop, never inside the call. A call returns -1 with err filled
 * only when it could not even start (then the callback never runs).
 *
 * An instance is identified by (node, handle): the node is where it runs
 * ("" for this machine, an ssh destination otherwise) and the handle is
 * the provider's own identity of the process, chosen so that it survives a
 * crash of deployctl (for a process: pid and start time). An instance whose
 * handle was never recorded (deployctl died right after starting it) is
 * found again through its tag, DEPLOY_INSTANCE=<tag prefix>#<instance id>,
 * which every instance carries in its environment. Recovery goes through
 * this interface only.
 *
 * The interface follows libgit2's sys/odb_backend.h: a versioned struct of
 * function pointers, `free` required; provider_check refuses a vtable of
 * another version before it is ever called. */
#ifndef DEPLOY_PROVIDER_H
#define DEPLOY_PROVIDER_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "store.h"

#define PROVIDER_VERSION 5

/* What a provider reports about one instance it started or found. */
typedef struct provider_instance {
  char host[256];      /* address routed to and health-checked */
  int port;
  char handle[128];    /* survives a crash of deployctl */
  int pid;             /* for people */
  uint64_t pid_start;
  char log_path[512];
  double started_at;   /* engine clock */
} provider_instance;

typedef struct provider_start_req {
  const store_instance *inst; /* id, target, version, idx, node (recorded before the start) */
  const int *taken;           /* ports the store holds on inst->node */
  size_t ntaken;
} provider_start_req;

typedef void (*provider_start_cb)(void *payload, const provider_instance *pi, const char *err);
typedef void (*provider_cb)(void *payload, const char *err);
/* alive: the instance runs. found: when the instance row had no handle and
 * the instance was found by its tag, where it is (else NULL). err: the
 * provider could not tell (a host unreachable); alive is then 0. */
typedef void (*provider_inspect_cb)(void *payload, int alive, const provider_instance *found, const char *err);
/* An instance's output: called with each chunk as it comes (len > 0; text
 * valid during the call), then exactly once with done = 1, err set when
 * the log could not be read. */
typedef void (*provider_logs_cb)(void *payload, const char *text, size_t len, int done, const char *err);
/* What a prune did: files deleted, logs rotated, bytes freed; err names
 * what could not be done (a host unreachable, a directory unreadable). */
typedef void (*provider_prune_cb)(void *payload, size_t removed, size_t rotated, uint64_t freed, const char *err);
/* A logs call in progress (for logs_stop); the provider's own type. */
typedef struct provider_stream provider_stream;

typedef struct provider provider;
struct provider {
  int version;          /* PROVIDER_VERSION */
  const char *kind;     /* "process", "ssh" */
  /* Seconds: a rollout's health rounds ask inspect about the new instances
   * at most this often and reuse the last answer in between (0: every
   * round). A remote inspect is a command on every host. */
  double inspect_every;
  /* Its instances live on the engine's clock (the test provider: they
   * come up after a scripted number of seconds of it). Otherwise an
   * instance starts in real time, and on the virtual clock a rollout
   * holds the clock while new instances come up, so start_timeout counts
   * real seconds. */
  int on_engine_clock;
  /* Start one instance (its row exists): choose a port not in req->taken,
   * start it detached so it outlives deployctl, and report where. */
  int (*start)(provider *p, const provider_start_req *req, provider_start_cb cb, void *payload, char *err);
  /* Stop it: SIGTERM to its process group, SIGKILL after the stop timeout.
   * One already gone, or whose handle now names another process, completes
   * at once without a signal. */
  int (*stop)(provider *p, const store_instance *inst, provider_cb cb, void *payload, char *err);
  int (*inspect)(provider *p, const store_instance *inst, provider_inspect_cb cb, void *payload, char *err);
  /* The last `lines` lines of the instance's log; with follow, then what
   * is written to it, until logs_stop. *out (may be NULL) names the call
   * for logs_stop until cb has run with done = 1. */
  int (*logs)(provider *p, const store_instance *inst, int lines, int follow, provider_logs_cb cb, void *payload,
              provider_stream **out, char *err);
  /* Ends a logs call early: cb runs once more, with done = 1, from the
   * loop. */
  void (*logs_stop)(provider *p, provider_stream *s);
  /* Optional (NULL: nothing can be checked in advance). Can instances
   * start on every one of these nodes now? Called before a rollout starts
   * anything; cb's err names each node that cannot, and why. */
  int (*preflight)(provider *p, const char *const *nodes, size_t n, provider_cb cb, void *payload, char *err);
  /* Optional (NULL: the provider keeps nothing per version). Retention on
   * every one of these nodes: deletes the logs of target's versions in
   * drop (never one written within the last few seconds), and rotates any
   * other log of the target past max_bytes (0: never), see logprune.h. */
  int (*prune)(provider *p, const char *target, const char *const *nodes, size_t nnodes, const char *const *drop,
               size_t ndrop, uint64_t max_bytes, provider_prune_cb cb, void *payload, char *err);
  void (*free)(provider *p);
};

int provider_check(const provider *p, char *err);

typedef struct provider_process_opts {
  const char *command;       /* shell command template: {port} {version} {target} {instance} {host} */
  int port_min, port_max;    /* inclusive */
  double stop_timeout;       /* seconds before SIGKILL; default 10 */
  const char *log_dir;       /* default ".deploy/logs" */
  const char *workdir;       /* default: current directory */
  const char *const *env;    /* extra NAME=value entries, NULL-terminated, may be NULL */
  const char *tag_prefix;    /* the store's location: each instance gets
                                DEPLOY_INSTANCE=<tag_prefix>#<instance id> */
} provider_process_opts;

int provider_process_new(provider **out, engine *e, const provider_process_opts *o, char *err);

/* How an instance this process started (pid, start time) ended: 1 with
 * its exit status and signal (0 when none), 0 when it is not known (it
 * runs, it was started by another process, or it is too long ago). */
int provider_process_exit_status(int pid, uint64_t start, int *status, int *sig);

typedef struct ssh_ctx ssh_ctx;

/* The ssh provider (ssh_provider.c): instances on the target's hosts (the
 * nodes), started through ssh.c by the remote agent (ssh_agent.h). */
typedef struct provider_ssh_opts {
  const char *command;       /* run by the host's /bin/sh: {port} {version} {target} {instance} {host};
                                ${NAME} is expanded there, from values sent on stdin */
  int port_min, port_max;    /* inclusive, on each host */
  double stop_timeout;       /* seconds before SIGKILL; default 10 */
  const char *log_dir;       /* on the hosts; relative: under the remote user's home;
                                default ".deployctl/logs" */
  const char *workdir;       /* on the hosts; NULL: the remote user's home */
  const char *const *env;    /* extra NAME=value entries, NULL-terminated, may be NULL */
  const char *tag_prefix;    /* the store's location (see provider_process_opts) */
  ssh_ctx *ssh;              /* the target's connections; must outlive the provider */
  double connect_timeout;    /* as given to ssh_ctx_new (0: its default, 10): bounds each command */
} provider_ssh_opts;

int provider_ssh_new(provider **out, engine *e, const provider_ssh_opts *o, char *err);

/* The test provider (test_provider.c): each instance is an HTTP server on
 * 127.0.0.1 inside this process, on the engine's loop, answering every
 * request (health checks included) as its script says, on the engine's
 * clock. For users' specs (deploy.testing) and for --simulate. Its
 * instances end with the provider. */
typedef struct provider_test_script {
  double start_time;         /* seconds after the start before it answers (a slow start); 0 */
  int unhealthy;             /* answers 500 from the first request on */
  double unhealthy_after;    /* seconds after it came up from which it answers 500; < 0: never */
  double error_rate;         /* share of answers that are 500, spread evenly (0.25: every 4th); 0..1 */
  double crash_after;        /* seconds after it came up its process is gone; < 0: never */
} provider_test_script;

typedef struct provider_test_opts {
  provider_test_script script;            /* every version's, unless listed below */
  const char *const *versions;            /* n versions with a script of their own */
  const provider_test_script *scripts;
  size_t n;
  /* Instances it did not start (rows of a real store, under --simulate)
   * are taken to be as the store records them: running, stopped at once. */
  int adopt;
} provider_test_opts;

void provider_test_script_default(provider_test_script *s);
int provider_test_new(provider **out, engine *e, const provider_test_opts *o, char *err);
/* Requests the instances of version (NULL: every version) answered, and
 * how many of those with a 5xx. -1 when p is not a test provider. */
int provider_test_stats(const provider *p, const char *version, unsigned long *requests, unsigned long *errors);

#endif
