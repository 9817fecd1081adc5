/* The remote side of the ssh provider: runtime/ssh_agent.sh, a POSIX sh
 * script compiled into the binary and sent with each command as
 * `sh -c '<script>' deployctl-agent VERB ARGS...` (nothing is installed on
 * the hosts). This file builds those command lines and reads the answers.
 *
 * Verbs and answers (one line each; the script's header has the details):
 *   hello    DEPLOYCTL-AGENT/1 hello addr=A boot=B
 *   start    DEPLOYCTL-AGENT/1 start port=P pid=N starttime=T boot=B log=PATH
 *   inspect  DEPLOYCTL-AGENT/1 inspect state=alive|dead pid=N starttime=T found=pid|tag|none boot=B
 *            (one line per instance asked about)
 *   stop     DEPLOYCTL-AGENT/1 stop result=stopped|killed|gone pid=N
 *   logs     the log's last lines, as they are
 *   failure  DEPLOYCTL-AGENT/1 error CODE MESSAGE, exit status 3
 *
 * Parsing is strict: one line, the fields in this order, numbers in range,
 * nothing before or after. Anything else (a login script that prints, an
 * agent of another protocol) is refused with a message naming the host.
 *
 * An instance is (pid, starttime, boot id) on its host: the pid alone may
 * have been reused, the start time (field 22 of /proc/PID/stat) tells
 * processes apart within one boot, the boot id across reboots. Its
 * environment carries DEPLOY_INSTANCE=<tag>, so `inspect` finds it again
 * when its pid was never recorded.
 *
 * Secrets: environment values travel on the command's stdin, never in an
 * argv (which `ps` shows every user of the host). The command template
 * must reach the agent with ${NAME} unexpanded: the instance's own shell
 * expands it from its environment. */
#ifndef DEPLOY_SSH_AGENT_H
#define DEPLOY_SSH_AGENT_H

#include <stddef.h>
#include <stdint.h>

#include "ssh.h"

#define SSH_AGENT_PROTO "DEPLOYCTL-AGENT/1"
#define SSH_AGENT_EXIT_ERROR 3
#define SSH_AGENT_PATH_MAX 1024          /* a log path in an answer */
#define SSH_AGENT_INPUT_MAX (1u << 20)   /* the encoded environment */
#define SSH_AGENT_BOOT_ID_LEN 36

typedef struct ssh_agent_start_req {
  const char *tag;        /* DEPLOY_INSTANCE: unique per instance, e.g. "<store>#<id>" */
  const char *version;
  const char *target;
  const char *command;    /* run by the host's /bin/sh; {port} is replaced
                             there, other placeholders by the caller,
                             ${NAME} never (see above) */
  const char *log_path;   /* relative: under the remote user's home */
  const char *workdir;    /* NULL: the remote user's home */
  int port_min, port_max; /* inclusive */
  const int *exclude;     /* ports the store knows are taken on that host */
  size_t nexclude;
  const char *const *env; /* "NAME=value", NULL-terminated, may be NULL */
} ssh_agent_start_req;

/* One instance on one host. */
typedef struct ssh_agent_instance {
  int port;               /* start only */
  int pid;
  uint64_t start_time;
  char boot_id[SSH_AGENT_BOOT_ID_LEN + 1];
  char log_path[SSH_AGENT_PATH_MAX];  /* start only; absolute */
} ssh_agent_instance;

typedef struct ssh_agent_state {
  int alive;
  int found_by_tag;       /* alive, but not as the pid we gave: by its tag */
  int pid;                /* 0 when dead */
  uint64_t start_time;
  char boot_id[SSH_AGENT_BOOT_ID_LEN + 1];  /* the host's, now */
} ssh_agent_state;

typedef enum ssh_agent_stop_result {
  SSH_AGENT_STOPPED,      /* exited after SIGTERM */
  SSH_AGENT_KILLED,       /* needed SIGKILL */
  SSH_AGENT_GONE,         /* was not running (or the pid is another's now): nothing signalled */
} ssh_agent_stop_result;

/* hello: the host can run instances; where the ssh client reached it. */
typedef struct ssh_agent_hello {
  char addr[64];          /* an IPv4 or IPv6 address, from SSH_CONNECTION */
  char boot_id[SSH_AGENT_BOOT_ID_LEN + 1];
} ssh_agent_hello;

/* One instance asked about by inspect: its tag, and what was recorded of
 * it (NULL: never recorded, look by tag only). */
typedef struct ssh_agent_query {
  const char *tag;
  const ssh_agent_instance *known;
} ssh_agent_query;

/* The remote command line for each verb (*cmd: heap, caller frees). start
 * also gives the stdin to send (*input: heap, may hold secrets: free it
 * with ssh_agent_free_input once ssh_run has copied it). -1 with err when
 * an argument is invalid; messages never quote an environment value. */
int ssh_agent_start_command(char **cmd, char **input, size_t *input_len,
                            const ssh_agent_start_req *r, char *err);
/* known may be NULL (pid never recorded): then only the tag is searched. */
int ssh_agent_inspect_command(char **cmd, const char *tag,
                              const ssh_agent_instance *known, char *err);
/* Several instances in one command: one answer line each, in order. */
int ssh_agent_inspect_many_command(char **cmd, const ssh_agent_query *q, size_t n, char *err);
int ssh_agent_hello_command(char **cmd, char *err);
/* timeout: seconds from SIGTERM to SIGKILL. The agent then waits up to
 * 5 s more: give ssh_run at least timeout + 10. */
int ssh_agent_stop_command(char **cmd, const ssh_agent_instance *inst,
                           double timeout, char *err);
int ssh_agent_logs_command(char **cmd, const char *log_path, int lines,
                           int follow, char *err);
void ssh_agent_free_input(char *input, size_t len);
/* Retention of target's logs in dir (see the agent's prune verb). */
int ssh_agent_prune_command(char **cmd, const char *dir, const char *target, const char *const *drop, size_t ndrop,
                            uint64_t max_bytes, char *err);

/* Reading a finished command's result (r->status must be SSH_OK: a
 * transport failure has its own message from ssh_cb). 0, or -1 with err
 * naming the host: the agent's own error, or an answer that does not
 * parse. */
int ssh_agent_parse_start(ssh_agent_instance *out, const ssh_result *r, char *err);
int ssh_agent_parse_inspect(ssh_agent_state *out, const ssh_result *r, char *err);
/* Exactly n answer lines, into out[0..n). */
int ssh_agent_parse_inspect_many(ssh_agent_state *out, size_t n, const ssh_result *r, char *err);
int ssh_agent_parse_hello(ssh_agent_hello *out, const ssh_result *r, char *err);
int ssh_agent_parse_stop(ssh_agent_stop_result *out, int *pid, const ssh_result *r,
                         char *err);
/* logs: the text is r->out itself; this checks it is not an error. */
int ssh_agent_parse_logs(const ssh_result *r, char *err);
int ssh_agent_parse_prune(size_t *removed, size_t *rotated, uint64_t *freed, const ssh_result *r, char *err);

/* The script, as compiled in. */
const char *ssh_agent_script(void);

#endif
