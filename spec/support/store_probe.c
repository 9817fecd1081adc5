/* store-probe: drives a store backend from a script, for specs.
 *
 *   store-probe LOCATION [TAG] < commands
 *
 * (TAG is ignored: specs put their directory there, so that cleanup finds
 * the process by its command line.) With STORE_PROBE_FOLLOW=1 in the
 * environment, stdin is a file that grows: at its end the probe keeps
 * reading (running the loop meanwhile) until a `quit` line.
 *
 * Opens the store at LOCATION (postgresql://... for the PostgreSQL backend),
 * then reads one command per line from stdin and prints one JSON object per
 * command on stdout (flushed), so a spec can drive it through a pipe and
 * read each answer as it comes. Words are separated by spaces; options are
 * key=value; a value may not hold spaces except data= and errors=, which take
 * the rest of the line.
 *
 * Writes (each its own commit unless inside batch ... commit):
 *   ensure T | begin T ID [version= pid= start= host= kind= strategy= user= created=]
 *   finish ID STATUS [promoted=1 tstatus= thealth= duration= errors=JSON]
 *   promote ID | event ID T KIND [ts= data=JSON] | iadd T ID IDX [version= node= host= port= state= handle=]
 *   iupdate INST [node= host= port= handle= pid= state= weight= server=] | idel INST
 *   control T COMMAND [by=] | recover | renew ID | take T HOLDER [purpose=reconcile] | release T HOLDER
 *   batch ... commit      (the writes between, in ONE commit call)
 * Reads: target T | get ID | history [T] [limit=N] | events ID | instances [T] | ports NODE
 *   | controls [AFTER] | lock T | integrity
 * Other: import SQLITE_PATH | copyfile SQLITE_PATH (store_pg_copy_file: its own connection)
 *   | stats | barrier PATH [timeout=S] | quit
 *
 * Every answer has "cmd", "rc" (ok | locked | notfound | error), "err" when
 * not ok, "ms" (milliseconds it took) and the rows the operation returned. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "store_backend.h"
#include "store_pg.h"
#include "util.h"

static engine E;
static store_backend *B;

/* ---- JSON out ---- */

static void jstr(const char *s) {
  putchar('"');
  for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
    if (*p == '"' || *p == '\\')
      printf("\\%c", *p);
    else if (*p == '\n')
      fputs("\\n", stdout);
    else if (*p < 0x20)
      printf("\\u%04x", *p);
    else
      putchar(*p);
  }
  putchar('"');
}

static void jkey(const char *k) {
  printf(",");
  jstr(k);
  printf(":");
}

static void jraw_or_null(const char *json) { /* a JSON column, as a string (or null) */
  if (json)
    jstr(json);
  else
    fputs("null", stdout);
}

static const char *rc_name(int rc) {
  switch (rc) {
  case DC_OK:
    return "ok";
  case DC_LOCKED:
    return "locked";
  case DC_NOTFOUND:
    return "notfound";
  default:
    return "error";
  }
}

static void print_deployment(const store_deployment *d) {
  printf("{\"id\":");
  jstr(d->id);
  printf(",\"seq\":%lld", (long long)d->seq);
  jkey("target"), jstr(d->target);
  jkey("version"), jstr(d->version);
  jkey("from_version"), jstr(d->from_version);
  jkey("kind"), jstr(d->kind);
  jkey("strategy"), jstr(d->strategy);
  jkey("status"), jstr(d->status);
  printf(",\"created_at\":%.3f,\"finished_at\":%.3f,\"duration\":%.3f", d->created_at, d->finished_at, d->duration);
  jkey("errors"), jraw_or_null(d->errors);
  jkey("metadata"), jraw_or_null(d->metadata);
  printf(",\"owner_pid\":%d,\"owner_start\":%llu", d->owner_pid, (unsigned long long)d->owner_start);
  jkey("owner_host"), jstr(d->owner_host);
  jkey("user"), jstr(d->user);
  printf("}");
}

static void print_instance(const store_instance *i) {
  printf("{\"id\":%lld", (long long)i->id);
  jkey("target"), jstr(i->target);
  jkey("deployment_id"), jstr(i->deployment_id);
  jkey("version"), jstr(i->version);
  printf(",\"idx\":%d", i->idx);
  jkey("node"), jstr(i->node);
  jkey("host"), jstr(i->host);
  printf(",\"port\":%d", i->port);
  jkey("handle"), jstr(i->handle);
  printf(",\"pid\":%d", i->pid);
  jkey("state"), jstr(i->state);
  printf(",\"weight\":%d", i->weight);
  jkey("server"), jstr(i->server);
  printf("}");
}

static void print_result(const char *cmd, const store_op *op, double ms) {
  printf("{\"cmd\":");
  jstr(cmd);
  jkey("rc"), jstr(rc_name(op->rc));
  if (op->rc != DC_OK)
    jkey("err"), jstr(op->err);
  printf(",\"ms\":%.3f", ms);
  if (op->out_id)
    printf(",\"id\":%lld", (long long)op->out_id);
  if (op->has_target) {
    const store_target *t = &op->target;
    printf(",\"target\":{\"name\":");
    jstr(t->name);
    jkey("current_version"), jstr(t->current_version);
    jkey("previous_version"), jstr(t->previous_version);
    jkey("live_deployment"), jstr(t->live_deployment);
    jkey("status"), jstr(t->status);
    jkey("health"), jstr(t->health);
    printf("}");
  }
  if (op->has_lock) {
    const store_lock *l = &op->lock;
    printf(",\"lock\":{\"target\":");
    jstr(l->target);
    jkey("deployment_id"), jstr(l->deployment_id);
    jkey("purpose"), jstr(l->purpose);
    printf(",\"pid\":%d,\"pid_start\":%llu", l->pid, (unsigned long long)l->pid_start);
    jkey("host"), jstr(l->host);
    printf(",\"acquired_at\":%.3f,\"expires_at\":%.3f,\"now\":%.3f}", l->acquired_at, l->expires_at, dc_wall_now());
  }
  if (op->ndeployments || op->kind == STORE_OP_HISTORY || op->kind == STORE_OP_RECOVER) {
    printf(",\"deployments\":[");
    for (size_t i = 0; i < op->ndeployments; i++) {
      if (i)
        putchar(',');
      print_deployment(&op->deployments[i]);
    }
    printf("]");
  }
  if (op->ninstances || op->kind == STORE_OP_INSTANCES) {
    printf(",\"instances\":[");
    for (size_t i = 0; i < op->ninstances; i++) {
      if (i)
        putchar(',');
      print_instance(&op->instances[i]);
    }
    printf("]");
  }
  if (op->nevents || op->kind == STORE_OP_EVENTS) {
    printf(",\"events\":[");
    for (size_t i = 0; i < op->nevents; i++) {
      const store_event *e = &op->events[i];
      printf("%s{\"id\":%lld", i ? "," : "", (long long)e->id);
      jkey("deployment_id"), jstr(e->deployment_id);
      jkey("kind"), jstr(e->kind);
      jkey("data"), jraw_or_null(e->data);
      printf("}");
    }
    printf("]");
  }
  if (op->ncontrols || op->kind == STORE_OP_CONTROLS) {
    printf(",\"controls\":[");
    for (size_t i = 0; i < op->ncontrols; i++) {
      const store_control *c = &op->controls[i];
      printf("%s{\"id\":%lld", i ? "," : "", (long long)c->id);
      jkey("deployment_id"), jstr(c->deployment_id);
      jkey("target"), jstr(c->target);
      jkey("command"), jstr(c->command);
      jkey("requested_by"), jstr(c->requested_by);
      printf("}");
    }
    printf("]");
  }
  if (op->nports || op->kind == STORE_OP_PORTS_IN_USE) {
    printf(",\"ports\":[");
    for (size_t i = 0; i < op->nports; i++)
      printf("%s%d", i ? "," : "", op->ports[i]);
    printf("]");
  }
  printf("}");
}


/* ---- running ---- */

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static void on_done(void *ctx) {
  *(int *)ctx = 1;
}

static void run(store_op **ops, size_t n, int write) {
  int done = 0;
  if (write)
    B->commit(B, ops, n, on_done, &done);
  else
    B->read(B, ops[0], on_done, &done);
  while (!done)
    uv_run(E.loop, UV_RUN_ONCE);
}

/* ---- parsing commands ---- */

#define MAXW 32

typedef struct words {
  char *w[MAXW];
  int n;
  char *rest_data, *rest_errors; /* data=..., errors=... take the rest of the line */
} words;

static void split(char *line, words *ws) {
  memset(ws, 0, sizeof *ws);
  char *d = strstr(line, " data=");
  if (d) {
    *d = '\0';
    ws->rest_data = d + 6;
  }
  char *e = strstr(line, " errors=");
  if (e) {
    *e = '\0';
    ws->rest_errors = e + 8;
  }
  for (char *tok = strtok(line, " \t"); tok && ws->n < MAXW; tok = strtok(NULL, " \t"))
    ws->w[ws->n++] = tok;
}

static const char *opt(const words *ws, const char *key, const char *dflt) {
  size_t kl = strlen(key);
  for (int i = 1; i < ws->n; i++)
    if (strncmp(ws->w[i], key, kl) == 0 && ws->w[i][kl] == '=')
      return ws->w[i] + kl + 1;
  return dflt;
}

/* Positional argument i (options skipped), or NULL. */
static const char *arg(const words *ws, int i) {
  int k = 0;
  for (int j = 1; j < ws->n; j++) {
    if (strchr(ws->w[j], '='))
      continue;
    if (++k == i)
      return ws->w[j];
  }
  return NULL;
}

static const char *arg_or(const words *ws, int i, const char *dflt) {
  const char *a = arg(ws, i);
  return a ? a : dflt;
}

/* Builds the op a command names; NULL when the command is not an op. */
static store_op *make_op(const words *ws) {
  const char *c = ws->w[0];
  store_op *op = calloc(1, sizeof *op);
  if (!op)
    return NULL;
  if (strcmp(c, "ensure") == 0) {
    op->kind = STORE_OP_TARGET_ENSURE;
    dc_strlcpy(op->name, arg_or(ws, 1, ""), sizeof op->name);
  } else if (strcmp(c, "begin") == 0) {
    op->kind = STORE_OP_BEGIN;
    store_deployment *d = &op->dep;
    dc_strlcpy(d->target, arg_or(ws, 1, ""), sizeof d->target);
    dc_strlcpy(d->id, arg_or(ws, 2, ""), sizeof d->id);
    dc_strlcpy(d->version, opt(ws, "version", "1.0"), sizeof d->version);
    dc_strlcpy(d->kind, opt(ws, "kind", "deploy"), sizeof d->kind);
    dc_strlcpy(d->strategy, opt(ws, "strategy", "rolling"), sizeof d->strategy);
    dc_strlcpy(d->user, opt(ws, "user", "probe@test"), sizeof d->user);
    dc_strlcpy(d->owner_host, opt(ws, "host", ""), sizeof d->owner_host);
    d->owner_pid = atoi(opt(ws, "pid", "0"));
    d->owner_start = strtoull(opt(ws, "start", "0"), NULL, 10);
    d->created_at = atof(opt(ws, "created", "0"));
    if (d->created_at == 0)
      d->created_at = dc_wall_now();
    if (ws->rest_data)
      d->metadata = strdup(ws->rest_data);
  } else if (strcmp(c, "finish") == 0) {
    op->kind = STORE_OP_FINISH;
    dc_strlcpy(op->id, arg_or(ws, 1, ""), sizeof op->id);
    dc_strlcpy(op->fin_status, arg_or(ws, 2, "succeeded"), sizeof op->fin_status);
    op->fin.id = op->id;
    op->fin.status = op->fin_status;
    op->fin.promoted = atoi(opt(ws, "promoted", "0"));
    op->fin.finished_at = dc_wall_now();
    op->fin.duration = atof(opt(ws, "duration", "1"));
    if (opt(ws, "tstatus", NULL)) {
      dc_strlcpy(op->fin_tstatus, opt(ws, "tstatus", ""), sizeof op->fin_tstatus);
      op->fin.target_status = op->fin_tstatus;
    }
    if (opt(ws, "thealth", NULL)) {
      dc_strlcpy(op->fin_thealth, opt(ws, "thealth", ""), sizeof op->fin_thealth);
      op->fin.target_health = op->fin_thealth;
    }
    if (ws->rest_errors) {
      op->fin_errors = strdup(ws->rest_errors);
      op->fin.errors_json = op->fin_errors;
    }
  } else if (strcmp(c, "promote") == 0) {
    op->kind = STORE_OP_PROMOTE;
    dc_strlcpy(op->id, arg_or(ws, 1, ""), sizeof op->id);
  } else if (strcmp(c, "event") == 0) {
    op->kind = STORE_OP_EVENT;
    dc_strlcpy(op->ev.deployment_id, arg_or(ws, 1, ""), sizeof op->ev.deployment_id);
    dc_strlcpy(op->ev.target, arg_or(ws, 2, ""), sizeof op->ev.target);
    dc_strlcpy(op->ev.kind, arg_or(ws, 3, "note"), sizeof op->ev.kind);
    op->ev.ts = atof(opt(ws, "ts", "0"));
    if (op->ev.ts == 0)
      op->ev.ts = dc_wall_now();
    if (ws->rest_data)
      op->ev.data = strdup(ws->rest_data);
  } else if (strcmp(c, "iadd") == 0 || strcmp(c, "iupdate") == 0) {
    store_instance *in = &op->inst;
    if (c[1] == 'a') {
      op->kind = STORE_OP_INSTANCE_ADD;
      dc_strlcpy(in->target, arg_or(ws, 1, ""), sizeof in->target);
      dc_strlcpy(in->deployment_id, arg_or(ws, 2, ""), sizeof in->deployment_id);
      in->idx = atoi(arg_or(ws, 3, "0"));
    } else {
      op->kind = STORE_OP_INSTANCE_UPDATE;
      in->id = strtoll(arg_or(ws, 1, "0"), NULL, 10);
    }
    dc_strlcpy(in->version, opt(ws, "version", "1.0"), sizeof in->version);
    dc_strlcpy(in->node, opt(ws, "node", ""), sizeof in->node);
    dc_strlcpy(in->host, opt(ws, "host", "127.0.0.1"), sizeof in->host);
    in->port = atoi(opt(ws, "port", "0"));
    dc_strlcpy(in->handle, opt(ws, "handle", ""), sizeof in->handle);
    in->pid = atoi(opt(ws, "pid", "0"));
    dc_strlcpy(in->state, opt(ws, "state", "starting"), sizeof in->state);
    in->weight = atoi(opt(ws, "weight", "0"));
    dc_strlcpy(in->server, opt(ws, "server", ""), sizeof in->server);
  } else if (strcmp(c, "idel") == 0) {
    op->kind = STORE_OP_INSTANCE_DELETE;
    op->id64 = strtoll(arg_or(ws, 1, "0"), NULL, 10);
  } else if (strcmp(c, "control") == 0) {
    op->kind = STORE_OP_CONTROL_SET;
    dc_strlcpy(op->name, arg_or(ws, 1, ""), sizeof op->name);
    dc_strlcpy(op->command, arg_or(ws, 2, ""), sizeof op->command);
    dc_strlcpy(op->by, opt(ws, "by", "probe@test"), sizeof op->by);
  } else if (strcmp(c, "recover") == 0) {
    op->kind = STORE_OP_RECOVER;
  } else if (strcmp(c, "take") == 0) {
    op->kind = STORE_OP_LOCK_TAKE;
    dc_strlcpy(op->name, arg_or(ws, 1, ""), sizeof op->name);
    dc_strlcpy(op->id, arg_or(ws, 2, ""), sizeof op->id);
    dc_strlcpy(op->command, opt(ws, "purpose", "reconcile"), sizeof op->command);
  } else if (strcmp(c, "release") == 0) {
    op->kind = STORE_OP_LOCK_RELEASE;
    dc_strlcpy(op->name, arg_or(ws, 1, ""), sizeof op->name);
    dc_strlcpy(op->id, arg_or(ws, 2, ""), sizeof op->id);
  } else if (strcmp(c, "renew") == 0) {
    op->kind = STORE_OP_LOCK_RENEW;
    dc_strlcpy(op->id, arg_or(ws, 1, ""), sizeof op->id);
  } else if (strcmp(c, "target") == 0) {
    op->kind = STORE_OP_TARGET_GET;
    dc_strlcpy(op->name, arg_or(ws, 1, ""), sizeof op->name);
  } else if (strcmp(c, "get") == 0) {
    op->kind = STORE_OP_DEPLOYMENT_GET;
    dc_strlcpy(op->id, arg_or(ws, 1, ""), sizeof op->id);
  } else if (strcmp(c, "history") == 0) {
    op->kind = STORE_OP_HISTORY;
    dc_strlcpy(op->name, arg_or(ws, 1, ""), sizeof op->name);
    op->limit = atoi(opt(ws, "limit", "0"));
  } else if (strcmp(c, "events") == 0) {
    op->kind = STORE_OP_EVENTS;
    dc_strlcpy(op->id, arg_or(ws, 1, ""), sizeof op->id);
  } else if (strcmp(c, "instances") == 0) {
    op->kind = STORE_OP_INSTANCES;
    dc_strlcpy(op->name, arg_or(ws, 1, ""), sizeof op->name);
  } else if (strcmp(c, "ports") == 0) {
    op->kind = STORE_OP_PORTS_IN_USE;
    dc_strlcpy(op->node, arg_or(ws, 1, ""), sizeof op->node);
  } else if (strcmp(c, "controls") == 0) {
    op->kind = STORE_OP_CONTROLS;
    op->id64 = strtoll(arg_or(ws, 1, "0"), NULL, 10);
  } else if (strcmp(c, "lock") == 0) {
    op->kind = STORE_OP_LOCK_GET;
    dc_strlcpy(op->name, arg_or(ws, 1, ""), sizeof op->name);
  } else if (strcmp(c, "integrity") == 0) {
    op->kind = STORE_OP_INTEGRITY;
  } else {
    free(op);
    return NULL;
  }
  return op;
}

static void print_simple(const char *cmd, int rc, const char *err, double ms) {
  printf("{\"cmd\":");
  jstr(cmd);
  jkey("rc"), jstr(rc_name(rc));
  if (rc != DC_OK)
    jkey("err"), jstr(err);
  printf(",\"ms\":%.3f}\n", ms);
}

static int import_done_flag;

static void on_import(void *payload, int rc, const char *err, const store_pg_import_counts *c) {
  double *t0 = payload;
  printf("{\"cmd\":\"import\"");
  jkey("rc"), jstr(rc_name(rc));
  if (rc != DC_OK)
    jkey("err"), jstr(err);
  printf(",\"ms\":%.3f,\"counts\":{\"targets\":%zu,\"deployments\":%zu,\"events\":%zu,\"locks\":%zu,"
         "\"instances\":%zu,\"controls\":%zu}}\n",
         now_ms() - *t0, c->targets, c->deployments, c->events, c->locks, c->instances, c->controls);
  import_done_flag = 1;
}

int main(int argc, char **argv) {
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: store-probe LOCATION [TAG] < commands\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (engine_init(&E, 0) != 0) {
    fprintf(stderr, "store-probe: cannot start the engine\n");
    return 1;
  }
  char err[DC_ERR_MAX] = "";
  double t0 = now_ms();
  if (store_pg_open(&B, &E, argv[1], err) != DC_OK) {
    print_simple("open", DC_ERROR, err, now_ms() - t0);
    engine_close(&E);
    return 1;
  }
  printf("{\"cmd\":\"open\",\"rc\":\"ok\",\"kind\":");
  jstr(B->kind);
  jkey("location"), jstr(B->location(B));
  printf(",\"lease\":%g}\n", B->lease_seconds);

  store_op *batch[4096];
  size_t nbatch = 0;
  int in_batch = 0;
  char line[8192];
  const char *follow_env = getenv("STORE_PROBE_FOLLOW");
  int follow = follow_env && strcmp(follow_env, "1") == 0;
  for (;;) {
    if (!fgets(line, sizeof line, stdin)) {
      if (!follow || ferror(stdin))
        break;
      /* the spec has not written the next command yet: a readiness poll,
       * with the store's connection still looked after */
      clearerr(stdin);
      uv_run(E.loop, UV_RUN_NOWAIT);
      struct timespec pause = {0, 2000000};
      nanosleep(&pause, NULL);
      continue;
    }
    line[strcspn(line, "\r\n")] = '\0';
    words ws;
    split(line, &ws);
    if (ws.n == 0 || ws.w[0][0] == '#')
      continue;
    const char *c = ws.w[0];
    t0 = now_ms();
    if (strcmp(c, "quit") == 0)
      break;
    if (strcmp(c, "batch") == 0) {
      in_batch = 1;
      nbatch = 0;
      print_simple("batch", DC_OK, "", 0);
      continue;
    }
    if (strcmp(c, "commit") == 0) {
      run(batch, nbatch, 1);
      double ms = now_ms() - t0;
      printf("{\"cmd\":\"commit\",\"rc\":\"ok\",\"ms\":%.3f,\"results\":[", ms);
      for (size_t i = 0; i < nbatch; i++) {
        if (i)
          putchar(',');
        print_result("op", batch[i], ms);
        store_op_free(batch[i]);
      }
      printf("]}\n");
      in_batch = 0;
      nbatch = 0;
      continue;
    }
    if (strcmp(c, "stats") == 0) {
      store_pg_stats s;
      store_pg_get_stats(B, &s);
      printf("{\"cmd\":\"stats\",\"rc\":\"ok\",\"connects\":%llu,\"transactions\":%llu,\"round_trips\":%llu,"
             "\"statements\":%llu}\n",
             (unsigned long long)s.connects, (unsigned long long)s.transactions,
             (unsigned long long)s.round_trips, (unsigned long long)s.statements);
      continue;
    }
    if (strcmp(c, "barrier") == 0) {
      /* waits (a readiness poll with a deadline) until PATH exists, so that
       * several probes act at the same moment */
      double deadline = t0 + 1000.0 * atof(opt(&ws, "timeout", "10"));
      struct stat sb;
      int ok = 0;
      while (!(ok = stat(arg_or(&ws, 1, ""), &sb) == 0) && now_ms() < deadline) {
        uv_run(E.loop, UV_RUN_NOWAIT);
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
      }
      print_simple("barrier", ok ? DC_OK : DC_ERROR, "timed out", now_ms() - t0);
      continue;
    }
    if (strcmp(c, "import") == 0 || strcmp(c, "copyfile") == 0) {
      import_done_flag = 0;
      int rc = c[0] == 'i' ? store_pg_import(B, arg_or(&ws, 1, ""), on_import, &t0, err)
                           : store_pg_copy_file(&E, arg_or(&ws, 1, ""), argv[1], on_import, &t0, err);
      if (rc != DC_OK) {
        print_simple("import", DC_ERROR, err, now_ms() - t0);
        continue;
      }
      while (!import_done_flag)
        uv_run(E.loop, UV_RUN_ONCE);
      continue;
    }
    store_op *op = make_op(&ws);
    if (!op) {
      print_simple(c, DC_ERROR, "unknown command", 0);
      continue;
    }
    int write = store_op_is_write(op->kind);
    if (in_batch && write && nbatch < sizeof batch / sizeof batch[0]) {
      batch[nbatch++] = op;
      continue;
    }
    run(&op, 1, write);
    print_result(c, op, now_ms() - t0);
    putchar('\n');
    store_op_free(op);
  }
  B->free(B);
  engine_close(&E);
  return 0;
}
