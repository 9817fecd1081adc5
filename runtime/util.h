/* Small helpers shared by the runtime: bounded string formatting, errors,
 * process identity. Nothing here knows about Lua. */
#ifndef DEPLOY_UTIL_H
#define DEPLOY_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>
#include <signal.h>

/* Every fallible runtime call takes `char *err` of at least DC_ERR_MAX bytes
 * and fills it with a message that names the thing and the fix. */
#define DC_ERR_MAX 512

/* Interrupts (SIGINT/SIGTERM) counted by the host's signal handler
 * (deployctl); a rollout waiting in the loop aborts when it grows. */
extern volatile sig_atomic_t dc_interrupts;
/* How many waits in this process handle SIGINT/SIGTERM themselves (a
 * running rollout aborts safely, a GitOps watch ends cleanly). While it is
 * 0, the host stops the Lua code that runs instead. This is its one
 * meaning: lifetimes go through references, not through it. */
extern volatile sig_atomic_t dc_interrupt_owners;

/* Return codes shared by the runtime. */
enum {
  DC_OK = 0,
  DC_ERROR = -1,      /* generic failure, message in err */
  DC_LOCKED = -2,     /* target locked by another deployment */
  DC_NOTFOUND = -3,
  DC_AMBIGUOUS = -4,  /* a prefix names more than one thing */
};

/* snprintf that always terminates and never overflows; returns dst. */
char *dc_fmt(char *dst, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
char *dc_vfmt(char *dst, size_t size, const char *fmt, va_list ap);
/* An error message into err (DC_ERR_MAX bytes); err may be NULL. */
void dc_errf(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Copy with truncation, always terminated. */
void dc_strlcpy(char *dst, const char *src, size_t size);

/* Start time of a process (field 22 of /proc/PID/stat, clock ticks since
 * boot). 0 when the process does not exist. Together with the pid this
 * identifies a process across pid reuse. */
uint64_t dc_proc_start_time(int pid);
/* True when pid is running (not a zombie) and, if start_time != 0, is the
 * same process that had that start time. */
int dc_proc_alive(int pid, uint64_t start_time);

/* Seconds rounded to the millisecond: what events record of a duration. */
double dc_round_ms(double seconds);

/* Wall-clock seconds since the epoch, with sub-second precision. */
double dc_wall_now(void);
/* ISO-8601 UTC with milliseconds: 2026-11-27T02:00:00.123Z (buf >= 32). */
void dc_iso8601(double t, char *buf, size_t size);

/* user@host of whoever runs this process (buf >= 128). */
void dc_whoami(char *buf, size_t size);

/* Expand {name} placeholders from a NULL-terminated list of name/value
 * pairs; unknown placeholders are left as they are. Returns 0, or -1 when the
 * result does not fit. */
int dc_expand_placeholders(char *dst, size_t size, const char *tmpl,
                           const char *const *pairs);
/* The same into a heap string (NULL when out of memory). */
char *dc_expand_placeholders_dup(const char *tmpl, const char *const *pairs);
/* Expand ${NAME} from the environment. Missing variables are an error naming
 * the variable. Returns 0 or -1 with err filled. */
int dc_expand_env(char *dst, size_t size, const char *src, char *err);

/* Versions: non-empty, at most 128 bytes, [A-Za-z0-9._+-], starting with a
 * letter or a digit (a version lands in file names and command lines: ".",
 * ".." and "-v" must not). Returns 0 or -1 with err filled (naming `what`). */
int dc_validate_version(const char *v, const char *what, char *err);
/* Target names: non-empty, at most 63 bytes, [A-Za-z0-9_-]. */
int dc_validate_target_name(const char *t, char *err);

/* Secrets: the values ${NAME} references in the configuration expand to.
 * dc_secret_note_refs registers the current values of every ${NAME} in a
 * template (values shorter than 4 bytes are ignored: redacting "1" would
 * garble everything); dc_redact replaces each registered value in s with
 * "***", in place: a secret is longer than its replacement, so the text
 * only ever shrinks. Errors and events pass through it before they are
 * stored or reported. There is no limit on the number of secrets. Returns
 * -1 when out of memory (the value is then not registered). */
int dc_secret_note_refs(const char *tmpl);
int dc_secret_add(const char *value);
void dc_redact(char *s);
size_t dc_secret_count(void);

/* A growable string: every append checks its allocation; after a failed
 * one `oom` is set and later appends do nothing. */
typedef struct dc_buf {
  char *data;      /* NUL-terminated when len > 0 */
  size_t len, cap;
  int oom;
} dc_buf;
void dc_buf_add(dc_buf *b, const char *s, size_t n);
void dc_buf_puts(dc_buf *b, const char *s);
void dc_buf_printf(dc_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The text (the caller frees it), or NULL after an allocation failed. */
char *dc_buf_take(dc_buf *b);
void dc_buf_free(dc_buf *b);
/* s with control characters written as escapes (\n, \t, \x1b), and bytes
 * that are no valid UTF-8 as \xNN: a name from outside (a file in a git
 * repository, an answer of whatever listens on a socket) printed in a
 * message can neither break a line, move the cursor, nor make JSON output
 * invalid. Heap; NULL when out of memory. */
char *dc_printable(const char *s);
/* Length of the valid UTF-8 sequence at p (1..4), or 0 when it is not one
 * (overlongs, surrogates and code points past U+10FFFF included). */
size_t dc_utf8_len(const unsigned char *p);

/* url with the password of its user-info part replaced by "***"
 * (https://bob:***@host/...): a URL in a message never shows one. */
void dc_redact_url(char *dst, size_t size, const char *url);

/* Drops a leading "deploy: " so a message can be wrapped in another that
 * already says it. */
const char *dc_unprefix(const char *msg);

/* A fresh deployment id: "d" + 12 hex digits of milliseconds + 6 random hex
 * digits, so ids sort by creation time. buf >= 24. */
void dc_new_id(char *buf, size_t size);

#endif
