/* Commands on remote hosts through the system's OpenSSH client, on the
 * engine's loop.
 *
 * Every command is `/usr/bin/ssh ... -- DEST COMMAND` spawned with uv_spawn,
 * its stdin, stdout and stderr libuv pipes, so the user's ~/.ssh/config,
 * agent, known_hosts, ProxyJump and keys work exactly as for `ssh` itself.
 *
 * Connection sharing: the first command for a destination opens one master
 * connection (`ssh -N -o ControlMaster=yes -o ControlPersist=...`, which
 * forks into the background once authenticated); commands queued meanwhile
 * wait for it, and every command then runs through it with
 * ControlMaster=no. So a run pays one TCP + key exchange + authentication
 * per destination, not one per command (ssh_ctx_connections counts them).
 * A command never opens a connection of its own (ProxyCommand=false stops
 * ssh's fallback when the master is gone): when the master has exited (idle
 * longer than ControlPersist, or its link died), the next command opens a
 * new one. The control sockets live in a private 0700 directory; unix
 * socket paths are limited to 108 bytes, so it must be short.
 * ssh_ctx_free closes the masters it opened: MUX_C_TERMINATE on the control
 * socket, as `ssh -O exit` sends it (that command when the master does not
 * answer).
 *
 * Host keys are checked strictly (StrictHostKeyChecking=yes): an unknown or
 * changed key is refused with an error naming the host; accept_new opts in
 * to trust-on-first-use, and even then a changed key is refused. BatchMode
 * is always on: ssh never prompts.
 *
 * The key (a path, or the key itself) is never printed, stored or logged;
 * ssh's own messages have its path replaced with "<ssh key>".
 *
 * Exit status 255 is ssh's own failure; anything else is the remote
 * command's (remote commands must not exit 255; the agent never does).
 *
 * A timeout kills the local ssh only: without a pty, sshd does not signal
 * the remote command, which runs on until it writes to the closed channel
 * (agent verbs are bounded; `logs --follow` ends on stdin EOF).
 *
 * Commands are real work: on the virtual clock, callers hold it
 * (engine_hold/engine_release) around them, as rollout.c does for
 * provider calls.
 *
 * The host process must ignore SIGPIPE (deployctl does): writing a
 * command's stdin after ssh exited would otherwise kill it. */
#ifndef DEPLOY_SSH_H
#define DEPLOY_SSH_H

#include <stddef.h>

#include "engine.h"

/* A command's stdout is collected up to this size; more is refused
 * (SSH_ETOOBIG: the command is killed), never truncated. Streamed output
 * (ssh_request.on_output) has no limit. */
#define SSH_OUT_MAX (4u << 20)
/* stderr, which holds ssh's own messages as well as the command's. */
#define SSH_ERR_TEXT_MAX (256u << 10)
/* A destination ([user@]host[:port]). */
#define SSH_DEST_MAX 255
/* control_dir: a ControlPath is <dir>/<n>, and ssh binds it first under a
 * 17-byte temporary suffix; sun_path holds 108 bytes. */
#define SSH_CONTROL_DIR_MAX 64

typedef struct ssh_ctx ssh_ctx;
typedef struct ssh_op ssh_op;

typedef struct ssh_opts {
  /* A private key: a path, or the key itself (text beginning with
   * "-----BEGIN", written to a 0600 file in the control directory).
   * NULL or "": $DEPLOY_SSH_KEY; neither set: ssh's own choice (agent,
   * ~/.ssh/id_*, IdentityFile from the config). When set, ssh gets
   * -i KEY -o IdentitiesOnly=yes. */
  const char *key_path;
  const char *known_hosts;  /* UserKnownHostsFile; NULL: ssh's default */
  const char *config_file;  /* ssh -F; NULL: ~/.ssh/config */
  int accept_new;           /* 1: StrictHostKeyChecking=accept-new */
  double connect_timeout;   /* seconds; 0: 10 */
  double persist;           /* ControlPersist, seconds; 0: 600 */
  const char *control_dir;  /* NULL: a new /tmp/deployctl-ssh-XXXXXX,
                               removed by ssh_ctx_free */
  /* Commands in flight per destination (more wait): sshd refuses sessions
   * beyond its MaxSessions, 10 by default. 0: 8. */
  int max_sessions;
  int no_sharing;           /* 1: every command its own connection */
  const char *ssh_path;     /* NULL: /usr/bin/ssh */
} ssh_opts;

typedef enum ssh_status {
  SSH_OK = 0,            /* the command ran; exit_status is its own */
  SSH_ESPAWN,            /* ssh could not be started */
  SSH_EHOSTKEY_CHANGED,  /* refused: the host's key differs from known_hosts */
  SSH_EHOSTKEY_UNKNOWN,  /* refused: no key for the host in known_hosts */
  SSH_EUNREACHABLE,      /* refused, no route, timed out, name unknown */
  SSH_EAUTH,             /* the host refused our authentication */
  SSH_ETIMEOUT,          /* the command's timeout passed: ssh was killed */
  SSH_ETOOBIG,           /* output beyond SSH_OUT_MAX / SSH_ERR_TEXT_MAX */
  SSH_ECONNLOST,         /* the shared connection went away mid-command */
  SSH_ETRANSPORT,        /* any other failure of ssh (exit 255) */
  SSH_ECANCELLED,        /* ssh_cancel, or ssh_ctx_free */
} ssh_status;

/* "ok", "hostkey-changed", ... (stable names for JSON and logs). */
const char *ssh_status_name(ssh_status s);

typedef struct ssh_result {
  ssh_status status;
  const char *dest;
  int exit_status;       /* the remote command's (status SSH_OK), else -1 */
  int term_signal;       /* the signal that ended the local ssh, else 0 */
  const char *out;       /* stdout, NUL-terminated ("" when streamed) */
  size_t out_len;
  const char *err_text;  /* stderr, NUL-terminated, key path redacted */
  size_t err_len;
  double seconds;        /* from ssh_run to completion */
} ssh_result;

/* Runs once per ssh_run that returned 0, from the loop, never inside a call
 * of this module. err is NULL when status is SSH_OK (whatever the remote
 * exit status), else a message naming the destination and the fix. r and
 * its strings live until cb returns. */
typedef void (*ssh_cb)(void *payload, const ssh_result *r, const char *err);
/* Streamed stdout, as it arrives. */
typedef void (*ssh_output_cb)(void *payload, const char *data, size_t len);

typedef struct ssh_request {
  const char *dest;         /* [user@]host[:port], [user@][v6]:port, a config alias */
  const char *command;      /* one remote shell command line */
  const char *stdin_data;   /* copied, and wiped once written: may hold secrets */
  size_t stdin_len;
  double timeout;           /* seconds from ssh_run, queueing included; 0: none */
  /* Set: stdout goes here instead of r->out, and stdin stays open until
   * the command ends (a remote `logs --follow` stops when it sees EOF). */
  ssh_output_cb on_output;
} ssh_request;

/* err: DC_ERR_MAX bytes. Checks the options (a missing key file is an
 * error that names DEPLOY_SSH_KEY or ssh.key, not the path) and creates the
 * control directory. */
int ssh_ctx_new(ssh_ctx **out, engine *e, const ssh_opts *o, char *err);
/* Cancels commands in flight (their callbacks run with SSH_ECANCELLED),
 * closes the masters it opened and removes its directory, asynchronously:
 * the memory goes once the loop has run the last of that. NULL is ignored. */
void ssh_ctx_free(ssh_ctx *c);

/* Starts a command. *out (may be NULL) is a handle for ssh_cancel, valid
 * until cb has run. -1 with err, and cb never runs, when the request is
 * invalid (a destination that could inject options is refused here, before
 * anything is spawned). */
int ssh_run(ssh_op **out, ssh_ctx *c, const ssh_request *req, ssh_cb cb,
            void *payload, char *err);
/* Makes dest's master connection listen on a new unix socket of this
 * machine (in the control directory; its path goes to local at once) and
 * carry every connection to it to remote_socket, a unix socket on the host
 * (OpenSSH's stream-local forwarding: `ssh -O forward -L LOCAL:REMOTE`).
 * The socket accepts connections once cb reports SSH_OK with exit status
 * 0; it lasts as long as the master. Needs connection sharing. cb and
 * *out as for ssh_run (r->out is empty). */
int ssh_forward(ssh_op **out, ssh_ctx *c, const char *dest, const char *remote_socket, char *local,
                size_t local_size, double timeout, ssh_cb cb, void *payload, char *err);
/* Kills the command's ssh; cb runs with SSH_ECANCELLED. */
void ssh_cancel(ssh_op *op);

/* TCP + authentication handshakes this context started for dest: masters
 * opened (target: 1 per destination per run), or with no_sharing one per
 * command. */
int ssh_ctx_connections(const ssh_ctx *c, const char *dest);

/* 0, or -1 with err: dest must be [user@]host[:port] or [user@][v6addr]:port
 * with no leading '-', no whitespace or control characters. */
int ssh_validate_dest(const char *dest, char *err);

/* A heap copy of s quoted for a POSIX shell ('...'), or NULL (no memory). */
char *ssh_shell_quote(const char *s);

#endif
