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

#define PROVIDER_VERSION 3

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

#endif
