/* The remote agent's answers (runtime/ssh_agent.c), read as the ssh
 * provider reads them after each command: whatever a host prints (a login
 * script that talks, another agent, a hostile host) is outside input. An
 * input is the remote exit status in decimal, a NUL, its stderr, a NUL,
 * then its stdout, NULs and all; every parser reads the same result, and
 * what each promises of an answer it accepts is checked. */
#include "fuzz.h"

#include <arpa/inet.h>

#include "ssh.h"
#include "ssh_agent.h"
#include "util.h"

#define DEST "deploy@10.0.0.7:2222"

static void check_err(const char *err) {
  FUZZ_CHECK(strncmp(err, "agent on '" DEST "': ", strlen("agent on '" DEST "': ")) == 0);
  /* An answer is quoted with its control bytes replaced: one line. */
  FUZZ_CHECK(strchr(err, '\n') == NULL && strchr(err, '\r') == NULL);
}

static void check_boot(const char *b) {
  FUZZ_CHECK(strlen(b) == SSH_AGENT_BOOT_ID_LEN);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *head[2];
  fuzz_split(data, size, head, 2);
  /* stdout: whatever follows the second NUL. */
  size_t at = 0;
  for (int nuls = 0; at < size && nuls < 2; at++)
    nuls += data[at] == 0;
  ssh_result r;
  memset(&r, 0, sizeof r);
  r.status = SSH_OK;
  r.dest = DEST;
  r.exit_status = atoi(head[0]);
  r.err_text = head[1];
  r.err_len = strlen(head[1]);
  char *out = fuzz_cstr(data + at, size - at);
  r.out = out;
  r.out_len = size - at;
  char err[DC_ERR_MAX];

  ssh_agent_instance inst;
  err[0] = '\0';
  if (ssh_agent_parse_start(&inst, &r, err) == 0) {
    FUZZ_CHECK(inst.port >= 1 && inst.port <= 65535 && inst.pid >= 2 && inst.start_time >= 1);
    FUZZ_CHECK(inst.log_path[0] == '/');
    check_boot(inst.boot_id);
  } else {
    check_err(err);
  }

  ssh_agent_state st[8];
  err[0] = '\0';
  if (ssh_agent_parse_inspect(&st[0], &r, err) == 0)
    FUZZ_CHECK(st[0].alive ? st[0].pid >= 2 && st[0].start_time > 0 : st[0].pid == 0 && !st[0].found_by_tag);
  else
    check_err(err);
  size_t lines = 0;
  for (size_t i = 0; i < r.out_len; i++)
    lines += r.out[i] == '\n';
  for (size_t n = lines ? lines - 1 : 0; n <= lines + 1 && n <= 8; n++) {
    err[0] = '\0';
    if (ssh_agent_parse_inspect_many(st, n, &r, err) == 0)
      FUZZ_CHECK(n == lines);
    else
      check_err(err);
  }

  ssh_agent_hello hello;
  unsigned char bin[16];
  err[0] = '\0';
  if (ssh_agent_parse_hello(&hello, &r, err) == 0) {
    FUZZ_CHECK(inet_pton(AF_INET, hello.addr, bin) == 1 || inet_pton(AF_INET6, hello.addr, bin) == 1);
    check_boot(hello.boot_id);
  } else {
    check_err(err);
  }

  ssh_agent_stop_result res;
  int pid;
  err[0] = '\0';
  if (ssh_agent_parse_stop(&res, &pid, &r, err) == 0)
    FUZZ_CHECK(pid >= 2);
  else
    check_err(err);

  err[0] = '\0';
  if (ssh_agent_parse_logs(&r, err) == 0)
    FUZZ_CHECK(r.exit_status == 0);
  else
    check_err(err);

  free(out);
  fuzz_free_parts(head, 2);
  return 0;
}
