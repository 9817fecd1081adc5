/* Command lines for the remote agent, and strict readers of its answers.
 * The protocol is described in ssh_agent.h and runtime/ssh_agent.sh. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* explicit_bzero */
#endif

#include "ssh_agent.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* static const unsigned char ssh_agent_sh[]: runtime/ssh_agent.sh, by
 * cli/embed.cmake. */
#include "ssh_agent_script.h"

#define PID_MAX_LIMIT 4194304   /* Linux's PID_MAX_LIMIT (2^22) */
#define TAG_MAX 512
#define ANSWER_SHOWN 120        /* bytes of an unexpected answer quoted */

const char *ssh_agent_script(void) {
  return (const char *)ssh_agent_sh;
}

/* ---- building command lines -------------------------------------------- */

typedef struct sb {
  char *p;
  size_t len, cap;
  int failed;
} sb;

static void sb_add(sb *b, const char *s, size_t n) {
  if (b->failed)
    return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1)
      cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->failed = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_adds(sb *b, const char *s) {
  sb_add(b, s, strlen(s));
}

/* A space, then s quoted for the remote shell. */
static void sb_arg(sb *b, const char *s) {
  char *q = ssh_shell_quote(s);
  if (!q) {
    b->failed = 1;
    return;
  }
  sb_adds(b, " ");
  sb_adds(b, q);
  free(q);
}

static void sb_int(sb *b, long long v) {
  char n[32];
  dc_fmt(n, sizeof n, "%lld", v);
  sb_arg(b, n);
}

/* `sh -c '<script>' deployctl-agent VERB` */
static void sb_begin(sb *b, const char *verb) {
  sb_adds(b, "sh -c");
  sb_arg(b, ssh_agent_script());
  sb_adds(b, " deployctl-agent");
  sb_arg(b, verb);
}

static int sb_end(sb *b, char **cmd, char *err) {
  if (b->failed) {
    free(b->p);
    dc_fmt(err, DC_ERR_MAX, "agent: out of memory building a command");
    return -1;
  }
  *cmd = b->p;
  return 0;
}

/* One printable line, at most max bytes (the agent checks the same). */
static int check_text(const char *what, const char *s, size_t max, char *err) {
  if (!s || !*s) {
    dc_fmt(err, DC_ERR_MAX, "agent: %s is empty", what);
    return -1;
  }
  if (strlen(s) > max) {
    dc_fmt(err, DC_ERR_MAX, "agent: %s is longer than %zu bytes", what, max);
    return -1;
  }
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p < 0x20 || *p == 0x7f) {
      dc_fmt(err, DC_ERR_MAX, "agent: %s holds a control character: use one printable line", what);
      return -1;
    }
  }
  return 0;
}

static int valid_name(const char *s, size_t n) {
  if (n == 0 || (s[0] >= '0' && s[0] <= '9'))
    return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '_'))
      return 0;
  }
  return 1;
}

/* NAME=value lines; the value escaped for printf %b (every backslash
 * doubled, so nothing of the value is ever an escape of its own). */
static int encode_env(sb *b, const char *const *env, char *err) {
  for (size_t i = 0; env && env[i]; i++) {
    const char *eq = strchr(env[i], '=');
    size_t n = eq ? (size_t)(eq - env[i]) : 0;
    if (!eq || !valid_name(env[i], n)) {
      /* By position: a malformed entry may be a pasted secret. */
      dc_fmt(err, DC_ERR_MAX, "agent: environment entry %zu is not NAME=value with NAME made of letters, digits and '_'",
             i + 1);
      return -1;
    }
    sb_add(b, env[i], n + 1);
    for (const unsigned char *p = (const unsigned char *)eq + 1; *p; p++) {
      char esc[8];
      if (*p == '\\') {
        sb_adds(b, "\\\\");
      } else if (*p == '\n') {
        sb_adds(b, "\\n");
      } else if (*p < 0x20 || *p == 0x7f) {
        dc_fmt(esc, sizeof esc, "\\0%03o", *p);
        sb_adds(b, esc);
      } else {
        sb_add(b, (const char *)p, 1);
      }
    }
    sb_adds(b, "\n");
    if (b->len > SSH_AGENT_INPUT_MAX) {
      dc_fmt(err, DC_ERR_MAX, "agent: the environment passes %u bytes once encoded: pass fewer or smaller values",
             SSH_AGENT_INPUT_MAX);
      return -1;
    }
  }
  return 0;
}

void ssh_agent_free_input(char *input, size_t len) {
  if (!input)
    return;
  explicit_bzero(input, len);
  free(input);
}

static int check_start(const ssh_agent_start_req *r, char *err) {
  if (check_text("the instance tag", r->tag, TAG_MAX, err) != 0 ||
      check_text("the version", r->version, 128, err) != 0 ||
      check_text("the target", r->target, 128, err) != 0 ||
      check_text("the log path", r->log_path, SSH_AGENT_PATH_MAX - 256, err) != 0 ||
      (r->workdir && check_text("the working directory", r->workdir, SSH_AGENT_PATH_MAX, err) != 0))
    return -1;
  if (!r->command || !*r->command) {
    dc_fmt(err, DC_ERR_MAX, "agent: the command is empty: give the shell command that starts one instance");
    return -1;
  }
  if (r->port_min < 1 || r->port_max > 65535 || r->port_min > r->port_max) {
    dc_fmt(err, DC_ERR_MAX, "agent: ports %d-%d are not a range within 1-65535", r->port_min, r->port_max);
    return -1;
  }
  for (size_t i = 0; i < r->nexclude; i++) {
    if (r->exclude[i] < 1 || r->exclude[i] > 65535) {
      dc_fmt(err, DC_ERR_MAX, "agent: excluded port %d is not within 1-65535", r->exclude[i]);
      return -1;
    }
  }
  return 0;
}

int ssh_agent_start_command(char **cmd, char **input, size_t *input_len,
                            const ssh_agent_start_req *r, char *err) {
  *cmd = NULL;
  *input = NULL;
  *input_len = 0;
  if (check_start(r, err) != 0)
    return -1;
  sb in = {0};
  if (encode_env(&in, r->env, err) != 0) {
    ssh_agent_free_input(in.p, in.cap);
    return -1;
  }
  if (in.failed) {
    ssh_agent_free_input(in.p, in.cap);
    dc_fmt(err, DC_ERR_MAX, "agent: out of memory encoding the environment");
    return -1;
  }
  sb b = {0}, ex = {0};
  char range[32];
  dc_fmt(range, sizeof range, "%d-%d", r->port_min, r->port_max);
  for (size_t i = 0; i < r->nexclude; i++) {
    char n[16];
    dc_fmt(n, sizeof n, i ? ",%d" : "%d", r->exclude[i]);
    sb_adds(&ex, n);
  }
  sb_begin(&b, "start");
  sb_arg(&b, "--tag");
  sb_arg(&b, r->tag);
  sb_arg(&b, "--ports");
  sb_arg(&b, range);
  if (ex.len > 0) {
    sb_arg(&b, "--exclude");
    sb_arg(&b, ex.p);
  }
  sb_arg(&b, "--log");
  sb_arg(&b, r->log_path);
  sb_arg(&b, "--version");
  sb_arg(&b, r->version);
  sb_arg(&b, "--target");
  sb_arg(&b, r->target);
  if (r->workdir) {
    sb_arg(&b, "--workdir");
    sb_arg(&b, r->workdir);
  }
  sb_arg(&b, "--");
  sb_arg(&b, r->command);
  if (ex.failed)
    b.failed = 1;
  free(ex.p);
  if (sb_end(&b, cmd, err) != 0) {
    ssh_agent_free_input(in.p, in.cap);
    return -1;
  }
  *input = in.p;
  *input_len = in.len;
  return 0;
}

static int check_instance(const ssh_agent_instance *i, char *err) {
  if (i->pid < 2 || i->pid > PID_MAX_LIMIT) {
    dc_fmt(err, DC_ERR_MAX, "agent: pid %d is not an instance's (2-%d)", i->pid, PID_MAX_LIMIT);
    return -1;
  }
  return check_text("the boot id", i->boot_id, SSH_AGENT_BOOT_ID_LEN, err);
}

int ssh_agent_inspect_command(char **cmd, const char *tag,
                              const ssh_agent_instance *known, char *err) {
  *cmd = NULL;
  if (check_text("the instance tag", tag, TAG_MAX, err) != 0)
    return -1;
  if (known && check_instance(known, err) != 0)
    return -1;
  sb b = {0};
  sb_begin(&b, "inspect");
  sb_arg(&b, "--tag");
  sb_arg(&b, tag);
  if (known) {
    sb_arg(&b, "--pid");
    sb_int(&b, known->pid);
    sb_arg(&b, "--starttime");
    sb_int(&b, (long long)known->start_time);
    sb_arg(&b, "--boot");
    sb_arg(&b, known->boot_id);
  }
  return sb_end(&b, cmd, err);
}

int ssh_agent_inspect_many_command(char **cmd, const ssh_agent_query *q, size_t n, char *err) {
  *cmd = NULL;
  if (n == 0) {
    dc_fmt(err, DC_ERR_MAX, "agent: inspect needs at least one instance");
    return -1;
  }
  for (size_t i = 0; i < n; i++) {
    if (check_text("the instance tag", q[i].tag, TAG_MAX, err) != 0 ||
        (q[i].known && check_instance(q[i].known, err) != 0))
      return -1;
  }
  sb b = {0};
  sb_begin(&b, "inspect");
  for (size_t i = 0; i < n; i++) {
    sb_arg(&b, "--tag");
    sb_arg(&b, q[i].tag);
    if (q[i].known) {
      sb_arg(&b, "--pid");
      sb_int(&b, q[i].known->pid);
      sb_arg(&b, "--starttime");
      sb_int(&b, (long long)q[i].known->start_time);
      sb_arg(&b, "--boot");
      sb_arg(&b, q[i].known->boot_id);
    }
  }
  return sb_end(&b, cmd, err);
}

int ssh_agent_hello_command(char **cmd, char *err) {
  sb b = {0};
  *cmd = NULL;
  sb_begin(&b, "hello");
  return sb_end(&b, cmd, err);
}

int ssh_agent_stop_command(char **cmd, const ssh_agent_instance *inst,
                           double timeout, char *err) {
  *cmd = NULL;
  if (check_instance(inst, err) != 0)
    return -1;
  if (!(timeout > 0 && timeout <= 86400)) {
    dc_fmt(err, DC_ERR_MAX, "agent: stop timeout %g is not between 0 and 86400 seconds", timeout);
    return -1;
  }
  sb b = {0};
  sb_begin(&b, "stop");
  sb_arg(&b, "--pid");
  sb_int(&b, inst->pid);
  sb_arg(&b, "--starttime");
  sb_int(&b, (long long)inst->start_time);
  sb_arg(&b, "--boot");
  sb_arg(&b, inst->boot_id);
  sb_arg(&b, "--timeout-ms");
  sb_int(&b, (long long)(timeout * 1000.0 + 0.5));
  return sb_end(&b, cmd, err);
}

int ssh_agent_logs_command(char **cmd, const char *log_path, int lines,
                           int follow, char *err) {
  *cmd = NULL;
  if (check_text("the log path", log_path, SSH_AGENT_PATH_MAX, err) != 0)
    return -1;
  if (lines < 0 || lines > 1000000) {
    dc_fmt(err, DC_ERR_MAX, "agent: %d log lines: give 0-1000000", lines);
    return -1;
  }
  sb b = {0};
  sb_begin(&b, "logs");
  sb_arg(&b, "--log");
  sb_arg(&b, log_path);
  sb_arg(&b, "--lines");
  sb_int(&b, lines);
  if (follow)
    sb_arg(&b, "--follow");
  return sb_end(&b, cmd, err);
}

int ssh_agent_prune_command(char **cmd, const char *dir, const char *target, const char *const *drop, size_t ndrop,
                            uint64_t max_bytes, char *err) {
  *cmd = NULL;
  if (check_text("the log directory", dir, SSH_AGENT_PATH_MAX, err) != 0 ||
      check_text("the target", target, 64, err) != 0)
    return -1;
  sb b = {0};
  sb_begin(&b, "prune");
  sb_arg(&b, "--dir");
  sb_arg(&b, dir);
  sb_arg(&b, "--target");
  sb_arg(&b, target);
  sb_arg(&b, "--max-bytes");
  sb_int(&b, (long long)max_bytes);
  for (size_t i = 0; i < ndrop; i++) {
    if (check_text("a version", drop[i], 128, err) != 0) {
      free(b.p);
      return -1;
    }
    sb_arg(&b, "--drop");
    sb_arg(&b, drop[i]);
  }
  return sb_end(&b, cmd, err);
}

/* ---- reading answers ---------------------------------------------------- */

/* The answer as one line (without its newline) in dst, or -1: not exactly
 * one newline-terminated line of printable text. */
static int one_line(char *dst, size_t size, const char *text, size_t len) {
  if (len == 0 || len >= size || text[len - 1] != '\n')
    return -1;
  for (size_t i = 0; i + 1 < len; i++) {
    unsigned char c = (unsigned char)text[i];
    if (c < 0x20 || c == 0x7f)
      return -1;
  }
  memcpy(dst, text, len - 1);
  dst[len - 1] = '\0';
  return 0;
}

static void unexpected(char *err, const ssh_result *r, const char *verb) {
  char shown[ANSWER_SHOWN + 1];
  size_t n = 0;
  for (size_t i = 0; i < r->out_len && n < ANSWER_SHOWN; i++) {
    unsigned char c = (unsigned char)r->out[i];
    shown[n++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
  }
  shown[n] = '\0';
  dc_fmt(err, DC_ERR_MAX,
         "agent on '%s': unexpected answer to %s: '%s%s' (does a login script of the remote user print something? "
         "the agent needs a quiet non-interactive shell)",
         r->dest, verb, shown, r->out_len > ANSWER_SHOWN ? "..." : "");
}

/* The agent's own failure line: "<proto> error CODE MESSAGE". */
static void agent_error(char *err, const ssh_result *r, const char *verb) {
  char line[DC_ERR_MAX];
  static const char prefix[] = SSH_AGENT_PROTO " error ";
  if (one_line(line, sizeof line, r->out, r->out_len) == 0 &&
      strncmp(line, prefix, sizeof prefix - 1) == 0) {
    const char *code = line + sizeof prefix - 1;
    const char *msg = strchr(code, ' ');
    if (msg && msg > code) {
      dc_fmt(err, DC_ERR_MAX, "agent on '%s': %s failed: %s (%.*s)", r->dest, verb, msg + 1,
             (int)(msg - code), code);
      return;
    }
  }
  unexpected(err, r, verb);
}

/* Common checks: ssh delivered, the agent answered 0 (or its error). */
static int answered(const ssh_result *r, const char *verb, char *line, size_t size,
                    char *err) {
  if (r->status != SSH_OK) {
    dc_fmt(err, DC_ERR_MAX, "agent on '%s': %s got no answer (%s)", r->dest, verb,
           ssh_status_name(r->status));
    return -1;
  }
  if (r->exit_status == SSH_AGENT_EXIT_ERROR) {
    agent_error(err, r, verb);
    return -1;
  }
  if (r->exit_status != 0) {
    char shown[160];
    size_t n = 0;
    for (size_t i = 0; i < r->err_len && n + 1 < sizeof shown; i++) {
      unsigned char c = (unsigned char)r->err_text[i];
      shown[n++] = (c < 0x20 || c == 0x7f) ? ' ' : (char)c;
    }
    shown[n] = '\0';
    dc_fmt(err, DC_ERR_MAX,
           "agent on '%s': %s exited with status %d: %s (the host needs a POSIX sh, setsid, tail and grep)",
           r->dest, verb, r->exit_status, n ? shown : "no message");
    return -1;
  }
  if (line && one_line(line, size, r->out, r->out_len) != 0) {
    unexpected(err, r, verb);
    return -1;
  }
  return 0;
}

/* A cursor over the answer's fields, each "key=value" followed by one space
 * or the end. */
typedef struct cursor {
  const char *p;
  int bad;
} cursor;

static void expect(cursor *c, const char *literal) {
  size_t n = strlen(literal);
  if (c->bad || strncmp(c->p, literal, n) != 0)
    c->bad = 1;
  else
    c->p += n;
}

/* The value of key: up to the next space (last: to the end). */
static size_t value(cursor *c, const char *key, int last, const char **v) {
  expect(c, key);
  if (c->bad)
    return 0;
  *v = c->p;
  size_t n = last ? strlen(c->p) : strcspn(c->p, " ");
  if (n == 0 || (!last && c->p[n] != ' ')) {
    c->bad = 1;
    return 0;
  }
  c->p += last ? n : n + 1;
  return n;
}

static uint64_t number(cursor *c, const char *key, int last, uint64_t min, uint64_t max) {
  const char *v = NULL;
  size_t n = value(c, key, last, &v);
  if (c->bad)
    return 0;
  if (n > 19 || (n > 1 && v[0] == '0')) {
    c->bad = 1;
    return 0;
  }
  uint64_t x = 0;
  for (size_t i = 0; i < n; i++) {
    if (v[i] < '0' || v[i] > '9') {
      c->bad = 1;
      return 0;
    }
    x = x * 10 + (uint64_t)(v[i] - '0');
  }
  if (x < min || x > max)
    c->bad = 1;
  return x;
}

/* One of the words in choices ("a|b|c"): its index. */
static int word(cursor *c, const char *key, int last, const char *const *choices) {
  const char *v = NULL;
  size_t n = value(c, key, last, &v);
  for (int i = 0; !c->bad && choices[i]; i++) {
    if (strlen(choices[i]) == n && strncmp(v, choices[i], n) == 0)
      return i;
  }
  c->bad = 1;
  return -1;
}

/* 8-4-4-4-12 lowercase hex, as the kernel writes it. */
static void boot(cursor *c, int last, char *dst) {
  const char *v = NULL;
  size_t n = value(c, "boot=", last, &v);
  if (c->bad)
    return;
  if (n != SSH_AGENT_BOOT_ID_LEN) {
    c->bad = 1;
    return;
  }
  for (size_t i = 0; i < n; i++) {
    int dash = i == 8 || i == 13 || i == 18 || i == 23;
    int hex = (v[i] >= '0' && v[i] <= '9') || (v[i] >= 'a' && v[i] <= 'f');
    if (dash ? v[i] != '-' : !hex) {
      c->bad = 1;
      return;
    }
  }
  memcpy(dst, v, n);
  dst[n] = '\0';
}

int ssh_agent_parse_start(ssh_agent_instance *out, const ssh_result *r, char *err) {
  char line[SSH_AGENT_PATH_MAX + 256];
  memset(out, 0, sizeof *out);
  if (answered(r, "start", line, sizeof line, err) != 0)
    return -1;
  cursor c = {line, 0};
  expect(&c, SSH_AGENT_PROTO " start ");
  out->port = (int)number(&c, "port=", 0, 1, 65535);
  out->pid = (int)number(&c, "pid=", 0, 2, PID_MAX_LIMIT);
  out->start_time = number(&c, "starttime=", 0, 1, UINT64_MAX / 2);
  boot(&c, 0, out->boot_id);
  const char *log = NULL;
  size_t n = value(&c, "log=", 1, &log);
  if (!c.bad && (n >= sizeof out->log_path || log[0] != '/'))
    c.bad = 1;
  if (c.bad) {
    memset(out, 0, sizeof *out);
    unexpected(err, r, "start");
    return -1;
  }
  memcpy(out->log_path, log, n);
  out->log_path[n] = '\0';
  return 0;
}

/* One inspect answer line; 0, or -1 (out zeroed). */
static int inspect_line(ssh_agent_state *out, const char *line) {
  static const char *const states[] = {"dead", "alive", NULL};
  static const char *const founds[] = {"none", "pid", "tag", NULL};
  memset(out, 0, sizeof *out);
  cursor c = {line, 0};
  expect(&c, SSH_AGENT_PROTO " inspect ");
  int alive = word(&c, "state=", 0, states);
  uint64_t pid = number(&c, "pid=", 0, 0, PID_MAX_LIMIT);
  uint64_t st = number(&c, "starttime=", 0, 0, UINT64_MAX / 2);
  int found = word(&c, "found=", 0, founds);
  boot(&c, 1, out->boot_id);
  /* alive names a process found by pid or tag; dead names none. */
  if (!c.bad && (alive ? (pid < 2 || st == 0 || found == 0) : (pid != 0 || st != 0 || found != 0)))
    c.bad = 1;
  if (c.bad) {
    memset(out, 0, sizeof *out);
    return -1;
  }
  out->alive = alive;
  out->found_by_tag = found == 2;
  out->pid = (int)pid;
  out->start_time = st;
  return 0;
}

int ssh_agent_parse_inspect(ssh_agent_state *out, const ssh_result *r, char *err) {
  char line[512];
  memset(out, 0, sizeof *out);
  if (answered(r, "inspect", line, sizeof line, err) != 0)
    return -1;
  if (inspect_line(out, line) != 0) {
    unexpected(err, r, "inspect");
    return -1;
  }
  return 0;
}

int ssh_agent_parse_inspect_many(ssh_agent_state *out, size_t n, const ssh_result *r, char *err) {
  char line[512];
  memset(out, 0, n * sizeof *out);
  if (answered(r, "inspect", NULL, 0, err) != 0)
    return -1;
  const char *p = r->out, *end = r->out + r->out_len;
  for (size_t i = 0; i < n; i++) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    if (!nl || one_line(line, sizeof line, p, (size_t)(nl - p) + 1) != 0 || inspect_line(&out[i], line) != 0) {
      memset(out, 0, n * sizeof *out);
      unexpected(err, r, "inspect");
      return -1;
    }
    p = nl + 1;
  }
  if (p != end) {
    memset(out, 0, n * sizeof *out);
    unexpected(err, r, "inspect");
    return -1;
  }
  return 0;
}

int ssh_agent_parse_hello(ssh_agent_hello *out, const ssh_result *r, char *err) {
  char line[512];
  memset(out, 0, sizeof *out);
  if (answered(r, "hello", line, sizeof line, err) != 0)
    return -1;
  cursor c = {line, 0};
  expect(&c, SSH_AGENT_PROTO " hello ");
  const char *addr = NULL;
  size_t n = value(&c, "addr=", 0, &addr);
  boot(&c, 1, out->boot_id);
  unsigned char bin[16];
  if (!c.bad && n < sizeof out->addr) {
    memcpy(out->addr, addr, n);
    out->addr[n] = '\0';
    if (inet_pton(AF_INET, out->addr, bin) != 1 && inet_pton(AF_INET6, out->addr, bin) != 1)
      c.bad = 1;
  } else {
    c.bad = 1;
  }
  if (c.bad) {
    memset(out, 0, sizeof *out);
    unexpected(err, r, "hello");
    return -1;
  }
  return 0;
}

int ssh_agent_parse_stop(ssh_agent_stop_result *out, int *pid, const ssh_result *r,
                         char *err) {
  static const char *const results[] = {"stopped", "killed", "gone", NULL};
  char line[256];
  *out = SSH_AGENT_GONE;
  *pid = 0;
  if (answered(r, "stop", line, sizeof line, err) != 0)
    return -1;
  cursor c = {line, 0};
  expect(&c, SSH_AGENT_PROTO " stop ");
  int res = word(&c, "result=", 0, results);
  uint64_t p = number(&c, "pid=", 1, 2, PID_MAX_LIMIT);
  if (c.bad) {
    unexpected(err, r, "stop");
    return -1;
  }
  *out = res == 0 ? SSH_AGENT_STOPPED : res == 1 ? SSH_AGENT_KILLED : SSH_AGENT_GONE;
  *pid = (int)p;
  return 0;
}

int ssh_agent_parse_prune(size_t *removed, size_t *rotated, uint64_t *freed, const ssh_result *r, char *err) {
  char line[256];
  *removed = *rotated = 0;
  *freed = 0;
  if (answered(r, "prune", line, sizeof line, err) != 0)
    return -1;
  cursor c = {line, 0};
  expect(&c, SSH_AGENT_PROTO " prune ");
  uint64_t rm = number(&c, "removed=", 0, 0, 1000000000);
  uint64_t rot = number(&c, "rotated=", 0, 0, 1000000000);
  uint64_t fr = number(&c, "freed=", 1, 0, UINT64_C(1) << 62);
  if (c.bad) {
    unexpected(err, r, "prune");
    return -1;
  }
  *removed = (size_t)rm;
  *rotated = (size_t)rot;
  *freed = fr;
  return 0;
}

int ssh_agent_parse_logs(const ssh_result *r, char *err) {
  return answered(r, "logs", NULL, 0, err);
}
