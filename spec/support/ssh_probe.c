/* ssh_probe: drives runtime/ssh.c and runtime/ssh_agent.c for
 * spec/ssh_spec.lua, on a real engine loop, and prints one JSON object.
 *
 *   ssh_probe [CTX OPTIONS] MODE ...
 *
 * CTX OPTIONS (ssh_opts): --key PATH, --key-env NAME (the key, path or
 * text, from that environment variable), --known-hosts FILE, --config
 * FILE, --accept-new, --connect-timeout S, --persist S, --control-dir DIR,
 * --max-sessions N, --no-share.
 *
 * MODES
 *   run [--timeout S] [--timeouts S,S,...] [--rounds N] [--stdin TEXT]
 *       DEST CMD [DEST CMD...]
 *       Each round runs every (DEST, CMD) at once; rounds run one after
 *       another. --timeouts: one per pair, instead of --timeout for all.
 *       --between CMD: a shell command run between rounds (the loop waits). {"results": [...], "connections": {DEST: n}, "seconds": s}
 *   agent-start DEST --tag T --ports LOW-HIGH [--exclude P,P] --log PATH
 *       --version V --target T [--workdir D] [--env-from NAME]... -- CMD
 *       --env-from passes NAME=<value of NAME in our environment>, so a
 *       secret never appears in this program's argv either.
 *   agent-inspect DEST --tag T [--pid N --starttime T --boot B]
 *   agent-stop DEST --pid N --starttime T --boot B [--stop-timeout S]
 *   agent-logs DEST --log PATH [--lines N]
 *   agent-follow DEST --log PATH --lines N --until TEXT [--timeout S]
 *       Streams the log until TEXT has arrived, then cancels.
 *   parse start|inspect|inspect-N|hello|stop|logs EXIT_STATUS   (the answer on stdin)
 *       Runs the parser alone on a made-up answer.
 *   Agent modes accept --timeout S (default 30) before DEST's options. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "ssh.h"
#include "ssh_agent.h"
#include "util.h"

#define MAX_JOBS 1024
#define MAX_ENV 32

static engine E;
static ssh_ctx *CTX;
static int PENDING;

/* ---- JSON output, written as it goes ---- */

static void jstr_n(const char *s, size_t n) {
  putchar('"');
  for (size_t i = 0; s && i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\')
      printf("\\%c", c);
    else if (c == '\n')
      fputs("\\n", stdout);
    else if (c < 0x20 || c == 0x7f)
      printf("\\u%04x", c);
    else
      putchar(c);
  }
  putchar('"');
}

static void jstr(const char *s) {
  if (!s)
    fputs("null", stdout);
  else
    jstr_n(s, strlen(s));
}

static void jkey(const char *k, int first) {
  if (!first)
    putchar(',');
  jstr(k);
  putchar(':');
}

static void usage(const char *msg) {
  fprintf(stderr, "ssh_probe: %s (see the header of spec/support/ssh_probe.c)\n", msg);
  exit(2);
}

static double num(const char *s, const char *what) {
  char *end;
  double v = strtod(s ? s : "", &end);
  if (!s || !*s || *end)
    usage(what);
  return v;
}

static void run_loop(void) {
  while (PENDING > 0)
    engine_run_once(&E);
}

/* ---- run ---- */

typedef struct job {
  const char *dest, *cmd;
  int round;
  int done;
  ssh_status status;
  int exit_status, term_signal;
  char *out, *err_text, *error;
  size_t out_len, err_len;
  double seconds;
} job;

static char *dup_n(const char *s, size_t n) {
  char *p = malloc(n + 1);
  if (!p)
    abort();
  memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

static void on_job(void *payload, const ssh_result *r, const char *err) {
  job *j = payload;
  j->done++;
  j->status = r->status;
  j->exit_status = r->exit_status;
  j->term_signal = r->term_signal;
  j->out = dup_n(r->out, r->out_len);
  j->out_len = r->out_len;
  j->err_text = dup_n(r->err_text, r->err_len);
  j->err_len = r->err_len;
  j->error = err ? dup_n(err, strlen(err)) : NULL;
  j->seconds = r->seconds;
  PENDING--;
}

static void print_job(const job *j, int first) {
  if (!first)
    putchar(',');
  printf("{\"dest\":");
  jstr(j->dest);
  printf(",\"round\":%d,\"callbacks\":%d,\"status\":", j->round, j->done);
  jstr(ssh_status_name(j->status));
  printf(",\"exit\":%d,\"signal\":%d,\"seconds\":%.4f,\"out\":", j->exit_status, j->term_signal,
         j->seconds);
  jstr_n(j->out, j->out_len);
  printf(",\"err_text\":");
  jstr_n(j->err_text, j->err_len);
  printf(",\"error\":");
  jstr(j->error);
  putchar('}');
}

static void print_connections(const char *const *dests, int n) {
  printf("\"connections\":{");
  int first = 1;
  for (int i = 0; i < n; i++) {
    int seen = 0;
    for (int k = 0; k < i; k++)
      seen |= strcmp(dests[k], dests[i]) == 0;
    if (seen)
      continue;
    jkey(dests[i], first);
    first = 0;
    printf("%d", ssh_ctx_connections(CTX, dests[i]));
  }
  putchar('}');
}

static int mode_run(int argc, char **argv) {
  double timeout = 30;
  int rounds = 1;
  const char *input = NULL, *timeouts = NULL, *between = NULL;
  int i = 0;
  for (; i < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
    if (i + 1 >= argc)
      usage("option without a value");
    if (strcmp(argv[i], "--timeout") == 0)
      timeout = num(argv[i + 1], "--timeout S");
    else if (strcmp(argv[i], "--rounds") == 0)
      rounds = (int)num(argv[i + 1], "--rounds N");
    else if (strcmp(argv[i], "--stdin") == 0)
      input = argv[i + 1];
    else if (strcmp(argv[i], "--timeouts") == 0)
      timeouts = argv[i + 1];
    else if (strcmp(argv[i], "--between") == 0)
      between = argv[i + 1];
    else
      usage("run: unknown option");
  }
  int pairs = (argc - i) / 2;
  if (pairs < 1 || (argc - i) % 2 != 0 || pairs * rounds > MAX_JOBS)
    usage("run: give DEST CMD pairs");
  job *jobs = calloc((size_t)(pairs * rounds), sizeof *jobs);
  const char **dests = calloc((size_t)pairs, sizeof *dests);
  int rejected = 0;
  double t0 = dc_wall_now();
  printf("{\"results\":[");
  for (int r = 0; r < rounds; r++) {
    if (r > 0 && between && system(between) != 0)
      fprintf(stderr, "ssh_probe: --between command failed\n");
    for (int p = 0; p < pairs; p++) {
      job *j = &jobs[r * pairs + p];
      j->dest = dests[p] = argv[i + 2 * p];
      j->cmd = argv[i + 2 * p + 1];
      j->round = r + 1;
      double t = timeout;
      const char *list = timeouts;
      for (int k = 0; list && k < p; k++) {
        list = strchr(list, ',');
        list = list ? list + 1 : NULL;
      }
      if (list)
        t = strtod(list, NULL);
      ssh_request req = {.dest = j->dest, .command = j->cmd, .timeout = t,
                         .stdin_data = input, .stdin_len = input ? strlen(input) : 0};
      char err[DC_ERR_MAX];
      if (ssh_run(NULL, CTX, &req, on_job, j, err) != 0) {
        j->status = SSH_ESPAWN;
        j->exit_status = -1;
        j->error = dup_n(err, strlen(err));
        j->out = dup_n("", 0);
        j->err_text = dup_n("", 0);
        rejected++;
        continue;
      }
      PENDING++;
    }
    run_loop();
  }
  for (int k = 0; k < pairs * rounds; k++)
    print_job(&jobs[k], k == 0);
  printf("],\"rejected\":%d,\"seconds\":%.4f,", rejected, dc_wall_now() - t0);
  print_connections(dests, pairs);
  printf("}\n");
  for (int k = 0; k < pairs * rounds; k++) {
    free(jobs[k].out);
    free(jobs[k].err_text);
    free(jobs[k].error);
  }
  free(jobs);
  free(dests);
  return 0;
}

/* ---- agent verbs ---- */

typedef struct call {
  ssh_result r;     /* strings copied */
  char *out, *err_text, *error;
  int done;
  const char *until;
  ssh_op *op;
  char *streamed;
  size_t streamed_len;
} call;

static void on_call(void *payload, const ssh_result *r, const char *err) {
  call *c = payload;
  c->done++;
  c->r = *r;
  c->out = dup_n(r->out, r->out_len);
  c->err_text = dup_n(r->err_text, r->err_len);
  c->error = err ? dup_n(err, strlen(err)) : NULL;
  c->r.out = c->out;
  c->r.err_text = c->err_text;
  c->r.dest = "";
  PENDING--;
}

static void on_stream(void *payload, const char *data, size_t len) {
  call *c = payload;
  char *p = realloc(c->streamed, c->streamed_len + len + 1);
  if (!p)
    abort();
  memcpy(p + c->streamed_len, data, len);
  c->streamed = p;
  c->streamed_len += len;
  p[c->streamed_len] = '\0';
  if (c->until && strstr(p, c->until))
    ssh_cancel(c->op);
}

static void print_call_head(const call *c, const char *dest) {
  printf("{\"dest\":");
  jstr(dest);
  printf(",\"callbacks\":%d,\"status\":", c->done);
  jstr(ssh_status_name(c->r.status));
  printf(",\"exit\":%d,\"out\":", c->r.exit_status);
  jstr_n(c->out, c->r.out_len);
  printf(",\"err_text\":");
  jstr_n(c->err_text, c->r.err_len);
  printf(",\"transport_error\":");
  jstr(c->error);
}

/* Ends the object and frees what on_call copied. */
static void print_tail(call *c, const char *dest) {
  putchar(',');
  print_connections(&dest, 1);
  printf("}\n");
  free(c->out);
  free(c->err_text);
  free(c->error);
  free(c->streamed);
}

static int do_call(call *c, const char *dest, char *cmd, char *input, size_t input_len,
                   double timeout, ssh_output_cb stream) {
  char err[DC_ERR_MAX];
  ssh_request req = {.dest = dest, .command = cmd, .stdin_data = input,
                     .stdin_len = input_len, .timeout = timeout, .on_output = stream};
  int r = ssh_run(&c->op, CTX, &req, on_call, c, err);
  ssh_agent_free_input(input, input_len);
  free(cmd);
  if (r != 0) {
    printf("{\"dest\":");
    jstr(dest);
    printf(",\"rejected\":true,\"error\":");
    jstr(err);
    printf("}\n");
    return 1;
  }
  PENDING++;
  run_loop();
  return 0;
}

/* Agent option values by name; argv order. */
typedef struct aopts {
  const char *tag, *ports, *exclude, *log, *version, *target, *workdir;
  const char *pid, *starttime, *boot, *until, *lines;
  double timeout, stop_timeout;
  const char *env_from[MAX_ENV];
  int nenv;
  const char *command;
} aopts;

static void parse_aopts(aopts *o, int argc, char **argv) {
  memset(o, 0, sizeof *o);
  o->timeout = 30;
  o->stop_timeout = 10;
  for (int i = 0; i < argc; i += 2) {
    const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(k, "--") == 0) {
      if (i + 2 != argc)
        usage("give the command after -- as one argument");
      o->command = v;
      return;
    }
    if (!v)
      usage("option without a value");
    if (strcmp(k, "--tag") == 0) o->tag = v;
    else if (strcmp(k, "--ports") == 0) o->ports = v;
    else if (strcmp(k, "--exclude") == 0) o->exclude = v;
    else if (strcmp(k, "--log") == 0) o->log = v;
    else if (strcmp(k, "--version") == 0) o->version = v;
    else if (strcmp(k, "--target") == 0) o->target = v;
    else if (strcmp(k, "--workdir") == 0) o->workdir = v;
    else if (strcmp(k, "--pid") == 0) o->pid = v;
    else if (strcmp(k, "--starttime") == 0) o->starttime = v;
    else if (strcmp(k, "--boot") == 0) o->boot = v;
    else if (strcmp(k, "--until") == 0) o->until = v;
    else if (strcmp(k, "--lines") == 0) o->lines = v;
    else if (strcmp(k, "--timeout") == 0) o->timeout = num(v, "--timeout S");
    else if (strcmp(k, "--stop-timeout") == 0) o->stop_timeout = num(v, "--stop-timeout S");
    else if (strcmp(k, "--env-from") == 0 && o->nenv < MAX_ENV) o->env_from[o->nenv++] = v;
    else usage("unknown agent option");
  }
}

static void fill_instance(ssh_agent_instance *inst, const aopts *o) {
  memset(inst, 0, sizeof *inst);
  inst->pid = (int)num(o->pid, "--pid N");
  inst->start_time = (uint64_t)num(o->starttime, "--starttime T");
  dc_strlcpy(inst->boot_id, o->boot ? o->boot : "", sizeof inst->boot_id);
}

static void print_instance(const ssh_agent_instance *i) {
  printf(",\"port\":%d,\"pid\":%d,\"starttime\":%llu,\"boot\":", i->port, i->pid,
         (unsigned long long)i->start_time);
  jstr(i->boot_id);
  printf(",\"log\":");
  jstr(i->log_path);
}

static int agent_start(const char *dest, const aopts *o) {
  char err[DC_ERR_MAX], *cmd = NULL, *input = NULL;
  size_t input_len = 0;
  int lo = 0, hi = 0, exclude[64], nex = 0;
  if (!o->ports || sscanf(o->ports, "%d-%d", &lo, &hi) != 2)
    usage("--ports LOW-HIGH");
  for (const char *p = o->exclude; p && *p && nex < 64;) {
    exclude[nex++] = atoi(p);
    p = strchr(p, ',');
    p = p ? p + 1 : NULL;
  }
  char *env[MAX_ENV + 1];
  int n = 0;
  for (int i = 0; i < o->nenv; i++) {
    const char *v = getenv(o->env_from[i]);
    if (!v)
      usage("--env-from NAME: NAME is not set");
    size_t a = strlen(o->env_from[i]), b = strlen(v);
    env[n] = malloc(a + b + 2);
    memcpy(env[n], o->env_from[i], a);
    env[n][a] = '=';
    memcpy(env[n] + a + 1, v, b + 1);
    n++;
  }
  env[n] = NULL;
  ssh_agent_start_req req = {
      .tag = o->tag, .version = o->version, .target = o->target, .command = o->command,
      .log_path = o->log, .workdir = o->workdir, .port_min = lo, .port_max = hi,
      .exclude = exclude, .nexclude = (size_t)nex, .env = (const char *const *)env};
  int r = ssh_agent_start_command(&cmd, &input, &input_len, &req, err);
  for (int i = 0; i < n; i++)
    free(env[i]);
  if (r != 0) {
    printf("{\"dest\":");
    jstr(dest);
    printf(",\"rejected\":true,\"error\":");
    jstr(err);
    printf("}\n");
    return 1;
  }
  call c = {0};
  if (do_call(&c, dest, cmd, input, input_len, o->timeout, NULL) != 0)
    return 1;
  c.r.dest = dest;
  ssh_agent_instance inst;
  int ok = c.r.status == SSH_OK && ssh_agent_parse_start(&inst, &c.r, err) == 0;
  print_call_head(&c, dest);
  printf(",\"ok\":%s,\"error\":", ok ? "true" : "false");
  jstr(ok ? NULL : c.error ? c.error : err);
  if (ok)
    print_instance(&inst);
  print_tail(&c, dest);
  return 0;
}

static int agent_inspect(const char *dest, const aopts *o) {
  char err[DC_ERR_MAX], *cmd = NULL;
  ssh_agent_instance known;
  if (o->pid)
    fill_instance(&known, o);
  if (ssh_agent_inspect_command(&cmd, o->tag, o->pid ? &known : NULL, err) != 0)
    usage(err);
  call c = {0};
  if (do_call(&c, dest, cmd, NULL, 0, o->timeout, NULL) != 0)
    return 1;
  c.r.dest = dest;
  ssh_agent_state st;
  int ok = c.r.status == SSH_OK && ssh_agent_parse_inspect(&st, &c.r, err) == 0;
  print_call_head(&c, dest);
  printf(",\"ok\":%s,\"error\":", ok ? "true" : "false");
  jstr(ok ? NULL : c.error ? c.error : err);
  if (ok) {
    printf(",\"alive\":%s,\"found_by_tag\":%s,\"pid\":%d,\"starttime\":%llu,\"boot\":",
           st.alive ? "true" : "false", st.found_by_tag ? "true" : "false", st.pid,
           (unsigned long long)st.start_time);
    jstr(st.boot_id);
  }
  print_tail(&c, dest);
  return 0;
}

static int agent_stop(const char *dest, const aopts *o) {
  char err[DC_ERR_MAX], *cmd = NULL;
  ssh_agent_instance inst;
  fill_instance(&inst, o);
  if (ssh_agent_stop_command(&cmd, &inst, o->stop_timeout, err) != 0)
    usage(err);
  call c = {0};
  if (do_call(&c, dest, cmd, NULL, 0, o->timeout, NULL) != 0)
    return 1;
  c.r.dest = dest;
  ssh_agent_stop_result res;
  int pid = 0;
  int ok = c.r.status == SSH_OK && ssh_agent_parse_stop(&res, &pid, &c.r, err) == 0;
  print_call_head(&c, dest);
  printf(",\"ok\":%s,\"error\":", ok ? "true" : "false");
  jstr(ok ? NULL : c.error ? c.error : err);
  if (ok) {
    printf(",\"result\":");
    jstr(res == SSH_AGENT_STOPPED ? "stopped" : res == SSH_AGENT_KILLED ? "killed" : "gone");
    printf(",\"pid\":%d", pid);
  }
  print_tail(&c, dest);
  return 0;
}

static int agent_logs(const char *dest, const aopts *o, int follow) {
  char err[DC_ERR_MAX], *cmd = NULL;
  int lines = o->lines ? (int)num(o->lines, "--lines N") : 100;
  if (ssh_agent_logs_command(&cmd, o->log, lines, follow, err) != 0)
    usage(err);
  call c = {0};
  c.until = o->until;
  if (do_call(&c, dest, cmd, NULL, 0, o->timeout, follow ? on_stream : NULL) != 0)
    return 1;
  c.r.dest = dest;
  int ok = follow ? c.r.status == SSH_ECANCELLED && c.streamed && strstr(c.streamed, o->until)
                  : c.r.status == SSH_OK && ssh_agent_parse_logs(&c.r, err) == 0;
  print_call_head(&c, dest);
  printf(",\"ok\":%s,\"error\":", ok ? "true" : "false");
  jstr(ok ? NULL : c.error ? c.error : err);
  printf(",\"streamed\":");
  jstr_n(c.streamed ? c.streamed : "", c.streamed_len);
  print_tail(&c, dest);
  return 0;
}

/* ---- parse alone ---- */

static int mode_parse(int argc, char **argv) {
  if (argc != 2)
    usage("parse VERB EXIT_STATUS");
  static char text[1 << 16];
  size_t n = fread(text, 1, sizeof text - 1, stdin);
  text[n] = '\0';
  ssh_result r = {.status = SSH_OK, .dest = "test-host", .exit_status = (int)num(argv[1], "EXIT"),
                  .out = text, .out_len = n, .err_text = "", .err_len = 0};
  char err[DC_ERR_MAX];
  int ok;
  if (strcmp(argv[0], "start") == 0) {
    ssh_agent_instance i;
    ok = ssh_agent_parse_start(&i, &r, err) == 0;
  } else if (strcmp(argv[0], "inspect") == 0) {
    ssh_agent_state s;
    ok = ssh_agent_parse_inspect(&s, &r, err) == 0;
  } else if (strncmp(argv[0], "inspect-", 8) == 0) {
    /* inspect-N: N answer lines */
    ssh_agent_state s[8];
    size_t want = (size_t)num(argv[0] + 8, "inspect-N");
    ok = want >= 1 && want <= 8 && ssh_agent_parse_inspect_many(s, want, &r, err) == 0;
  } else if (strcmp(argv[0], "hello") == 0) {
    ssh_agent_hello h;
    ok = ssh_agent_parse_hello(&h, &r, err) == 0;
  } else if (strcmp(argv[0], "stop") == 0) {
    ssh_agent_stop_result s;
    int pid;
    ok = ssh_agent_parse_stop(&s, &pid, &r, err) == 0;
  } else if (strncmp(argv[0], "stop-", 5) == 0) {
    /* stop-N: N answer lines (a batch of stops on one host) */
    ssh_agent_stop_result s[8];
    int pids[8];
    size_t want = (size_t)num(argv[0] + 5, "stop-N");
    ok = want >= 1 && want <= 8 && ssh_agent_parse_stop_many(s, pids, want, &r, err) == 0;
  } else {
    ok = ssh_agent_parse_logs(&r, err) == 0;
  }
  printf("{\"ok\":%s,\"error\":", ok ? "true" : "false");
  jstr(ok ? NULL : err);
  printf("}\n");
  return 0;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);  /* as deployctl does: ssh.h asks for it */
  ssh_opts o = {0};
  int i = 1;
  for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
    const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(k, "--accept-new") == 0) { o.accept_new = 1; continue; }
    if (strcmp(k, "--no-share") == 0) { o.no_sharing = 1; continue; }
    if (!v)
      usage("option without a value");
    i++;
    if (strcmp(k, "--key") == 0) o.key_path = v;
    else if (strcmp(k, "--key-env") == 0) o.key_path = getenv(v);
    else if (strcmp(k, "--known-hosts") == 0) o.known_hosts = v;
    else if (strcmp(k, "--config") == 0) o.config_file = v;
    else if (strcmp(k, "--connect-timeout") == 0) o.connect_timeout = num(v, "--connect-timeout S");
    else if (strcmp(k, "--persist") == 0) o.persist = num(v, "--persist S");
    else if (strcmp(k, "--control-dir") == 0) o.control_dir = v;
    else if (strcmp(k, "--max-sessions") == 0) o.max_sessions = (int)num(v, "--max-sessions N");
    else usage("unknown option");
  }
  if (i >= argc)
    usage("give a mode");
  const char *mode = argv[i++];
  if (strcmp(mode, "parse") == 0)
    return mode_parse(argc - i, argv + i);
  if (engine_init(&E, 0) != 0)
    usage("cannot create the loop");
  char err[DC_ERR_MAX];
  if (ssh_ctx_new(&CTX, &E, &o, err) != 0) {
    printf("{\"ctx_error\":");
    jstr(err);
    printf("}\n");
    engine_close(&E);
    return 0;
  }
  int rc;
  if (strcmp(mode, "run") == 0) {
    rc = mode_run(argc - i, argv + i);
  } else {
    if (i >= argc)
      usage("give DEST");
    const char *dest = argv[i++];
    aopts ao;
    parse_aopts(&ao, argc - i, argv + i);
    if (strcmp(mode, "agent-start") == 0) rc = agent_start(dest, &ao);
    else if (strcmp(mode, "agent-inspect") == 0) rc = agent_inspect(dest, &ao);
    else if (strcmp(mode, "agent-stop") == 0) rc = agent_stop(dest, &ao);
    else if (strcmp(mode, "agent-logs") == 0) rc = agent_logs(dest, &ao, 0);
    else if (strcmp(mode, "agent-follow") == 0) rc = agent_logs(dest, &ao, 1);
    else usage("unknown mode");
  }
  fflush(stdout);
  ssh_ctx_free(CTX);
  engine_close(&E);
  return rc;
}
