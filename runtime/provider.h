/* Providers start and stop the instances of a version. */
#ifndef DEPLOY_PROVIDER_H
#define DEPLOY_PROVIDER_H

#include <stddef.h>
#include "engine.h"
#include "store.h"

#define PROVIDER_VERSION 1

typedef void (*provider_cb)(void *payload, const char *err);

typedef struct provider provider;
struct provider {
  int version;
  const char *kind;  /* "process" */
  /* Choose a port for a new instance (the store knows which ones are
   * taken): fills inst->host and inst->port. -1 with err when the range is
   * exhausted ("no free port in 20000-20001 for target 'x': widen ...").*/
  int (*allocate)(provider *p, store *s, store_instance *inst, char *err);
  /* Start inst (host/port already allocated, inst->id assigned). On return
   * 0, inst->pid, pid_start, log_path and started_at are filled and the
   * process is running detached. Synchronous: spawning does not block. */
  int (*start)(provider *p, store_instance *inst, char *err);
  /* Stop inst: SIGTERM to its process group, SIGKILL after stop_timeout.
   * Asynchronous; cb runs once, when the process is gone. An instance
   * already gone (or whose pid now belongs to another process) completes
   * at once. */
  int (*stop)(provider *p, const store_instance *inst, provider_cb cb,
              void *payload, char *err);
  /* True while the instance's process is alive. */
  int (*alive)(provider *p, const store_instance *inst);
  void (*free)(provider *p);
};

typedef struct provider_process_opts {
  const char *command;       /* shell command template: {port} {version} {target} {instance} {host} */
  int port_min, port_max;    /* inclusive */
  double stop_timeout;       /* seconds before SIGKILL; default 10 */
  const char *log_dir;       /* default ".deploy/logs" */
  const char *workdir;       /* default: current directory */
  const char *const *env;    /* extra NAME=value entries, NULL-terminated, may be NULL */
  const char *tag_prefix;    /* the store's absolute path: each instance gets
                                DEPLOY_INSTANCE=<tag_prefix>#<instance id> in
                                its environment */
} provider_process_opts;

int provider_process_new(provider **out, engine *e,
                         const provider_process_opts *o, char *err);

/* Find a live process whose environment carries DEPLOY_INSTANCE=<tag>
 * (tag = "<tag_prefix>#<id>"; every instance is started with it): recovers a
 * process whose pid was never recorded because deployctl died right after
 * spawning it. 0 if none. */
int provider_find_instance_pid(const char *tag);

#endif
