#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <sys/random.h>

volatile sig_atomic_t dc_interrupts;
volatile sig_atomic_t dc_rollouts_waiting;

char *dc_vfmt(char *dst, size_t size, const char *fmt, va_list ap) {
  if (size == 0)
    return dst;
  int n = vsnprintf(dst, size, fmt, ap);
  if (n < 0)
    dst[0] = '\0';
  return dst;
}

char *dc_fmt(char *dst, size_t size, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  dc_vfmt(dst, size, fmt, ap);
  va_end(ap);
  return dst;
}

void dc_strlcpy(char *dst, const char *src, size_t size) {
  if (size == 0)
    return;
  size_t n = src ? strlen(src) : 0;
  if (n >= size)
    n = size - 1;
  if (n)
    memcpy(dst, src, n);
  dst[n] = '\0';
}

/* Reads /proc/PID/stat. The command name (field 2) may hold spaces and
 * parentheses, so fields are counted from the last ')'. */
static int read_stat(int pid, char *state, uint64_t *start) {
  char path[64], buf[1024];
  dc_fmt(path, sizeof path, "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f)
    return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  char *p = strrchr(buf, ')');
  if (!p || p[1] != ' ')
    return -1;
  p += 2;
  *state = *p;
  /* After ')' come fields 3..; starttime is field 22, i.e. the 20th here. */
  for (int field = 3; field < 22; field++) {
    p = strchr(p, ' ');
    if (!p)
      return -1;
    p++;
  }
  *start = strtoull(p, NULL, 10);
  return 0;
}

uint64_t dc_proc_start_time(int pid) {
  char state;
  uint64_t start = 0;
  if (pid <= 0 || read_stat(pid, &state, &start) != 0)
    return 0;
  return start;
}

int dc_proc_alive(int pid, uint64_t start_time) {
  char state;
  uint64_t start = 0;
  if (pid <= 0 || read_stat(pid, &state, &start) != 0)
    return 0;
  if (state == 'Z' || state == 'X')
    return 0;
  return start_time == 0 || start == start_time;
}

double dc_wall_now(void) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

void dc_iso8601(double t, char *buf, size_t size) {
  time_t secs = (time_t)t;
  int ms = (int)((t - (double)secs) * 1000.0);
  if (ms < 0)
    ms = 0;
  if (ms > 999)
    ms = 999;
  struct tm tm;
  gmtime_r(&secs, &tm);
  char base[32];
  strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm);
  dc_fmt(buf, size, "%s.%03dZ", base, ms);
}

void dc_whoami(char *buf, size_t size) {
  const char *user = getenv("USER");
  struct passwd *pw = getpwuid(getuid());
  if (pw && pw->pw_name)
    user = pw->pw_name;
  char host[64] = "localhost";
  if (gethostname(host, sizeof host) != 0)
    dc_strlcpy(host, "localhost", sizeof host);
  host[sizeof host - 1] = '\0';
  dc_fmt(buf, size, "%s@%s", user ? user : "unknown", host);
}

/* Appends src[0..n) to dst at *len; -1 when it does not fit. */
static int append(char *dst, size_t size, size_t *len, const char *src, size_t n) {
  if (*len + n >= size)
    return -1;
  memcpy(dst + *len, src, n);
  *len += n;
  dst[*len] = '\0';
  return 0;
}

static const char *lookup_pair(const char *const *pairs, const char *name, size_t n) {
  for (size_t i = 0; pairs && pairs[i] && pairs[i + 1]; i += 2) {
    if (strlen(pairs[i]) == n && strncmp(pairs[i], name, n) == 0)
      return pairs[i + 1];
  }
  return NULL;
}

int dc_expand_placeholders(char *dst, size_t size, const char *tmpl,
                           const char *const *pairs) {
  size_t len = 0;
  if (size == 0)
    return -1;
  dst[0] = '\0';
  for (const char *p = tmpl; *p;) {
    const char *close = (*p == '{') ? strchr(p + 1, '}') : NULL;
    const char *value = close ? lookup_pair(pairs, p + 1, (size_t)(close - p - 1)) : NULL;
    /* "${NAME}" belongs to environment expansion, not to placeholders. */
    if (value && !(p > tmpl && p[-1] == '$')) {
      if (append(dst, size, &len, value, strlen(value)) != 0)
        return -1;
      p = close + 1;
      continue;
    }
    if (append(dst, size, &len, p, 1) != 0)
      return -1;
    p++;
  }
  return 0;
}

int dc_expand_env(char *dst, size_t size, const char *src, char *err) {
  size_t len = 0;
  if (size == 0)
    return -1;
  dst[0] = '\0';
  for (const char *p = src; *p;) {
    if (p[0] == '$' && p[1] == '{') {
      const char *close = strchr(p + 2, '}');
      if (!close) {
        dc_fmt(err, DC_ERR_MAX, "deploy: unterminated '${' in a configuration string: write ${NAME}");
        return -1;
      }
      char name[128];
      size_t n = (size_t)(close - p - 2);
      if (n == 0 || n >= sizeof name) {
        dc_fmt(err, DC_ERR_MAX, "deploy: bad environment reference in a configuration string: write ${NAME}");
        return -1;
      }
      memcpy(name, p + 2, n);
      name[n] = '\0';
      const char *value = getenv(name);
      if (!value) {
        dc_fmt(err, DC_ERR_MAX, "deploy: environment variable %s is not set (referenced as ${%s} in the configuration): export it or remove the reference", name, name);
        return -1;
      }
      if (append(dst, size, &len, value, strlen(value)) != 0)
        goto too_long;
      p = close + 1;
      continue;
    }
    if (append(dst, size, &len, p, 1) != 0)
      goto too_long;
    p++;
  }
  return 0;
too_long:
  dc_fmt(err, DC_ERR_MAX, "deploy: a configuration string is longer than %zu bytes after ${...} expansion", size - 1);
  return -1;
}

int dc_validate_version(const char *v, const char *what, char *err) {
  if (!v || !*v) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s is empty: give a version such as '1.4.2'", what);
    return -1;
  }
  size_t n = strlen(v);
  if (n > 128) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s is %zu bytes long: at most 128 are allowed", what, n);
    return -1;
  }
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)v[i];
    if (!isalnum(c) && c != '.' && c != '_' && c != '+' && c != '-') {
      dc_fmt(err, DC_ERR_MAX, "deploy: %s has a character not allowed at byte %zu (0x%02x): use only A-Z a-z 0-9 . _ + -", what, i + 1, c);
      return -1;
    }
  }
  return 0;
}

int dc_validate_target_name(const char *t, char *err) {
  if (!t || !*t) {
    dc_fmt(err, DC_ERR_MAX, "deploy: target name is empty");
    return -1;
  }
  size_t n = strlen(t);
  if (n > 63) {
    dc_fmt(err, DC_ERR_MAX, "deploy: target name '%.40s...' is %zu bytes long: at most 63 are allowed", t, n);
    return -1;
  }
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)t[i];
    if (!isalnum(c) && c != '_' && c != '-') {
      dc_fmt(err, DC_ERR_MAX, "deploy: target name '%s' has a character not allowed: use only A-Z a-z 0-9 _ -", t);
      return -1;
    }
  }
  return 0;
}

void dc_json_string(char *dst, size_t size, const char *src) {
  size_t len = 0;
  if (size < 3) {
    if (size)
      dst[0] = '\0';
    return;
  }
  dst[len++] = '"';
  for (const unsigned char *p = (const unsigned char *)(src ? src : ""); *p; p++) {
    char esc[8];
    size_t n;
    if (*p == '"' || *p == '\\') {
      esc[0] = '\\';
      esc[1] = (char)*p;
      n = 2;
    } else if (*p < 0x20) {
      dc_fmt(esc, sizeof esc, "\\u%04x", *p);
      n = 6;
    } else {
      esc[0] = (char)*p;
      n = 1;
    }
    if (len + n + 2 > size)
      break;
    memcpy(dst + len, esc, n);
    len += n;
  }
  dst[len++] = '"';
  dst[len] = '\0';
}

void dc_new_id(char *buf, size_t size) {
  unsigned char rnd[3] = {0, 0, 0};
  if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
    unsigned v = (unsigned)getpid() ^ (unsigned)(dc_wall_now() * 1e6);
    memcpy(rnd, &v, sizeof rnd);
  }
  unsigned long long ms = (unsigned long long)(dc_wall_now() * 1000.0);
  dc_fmt(buf, size, "d%012llx%02x%02x%02x", ms, rnd[0], rnd[1], rnd[2]);
}

#define DC_MAX_SECRETS 64
static char *secrets[DC_MAX_SECRETS];
static int nsecrets;

void dc_secret_note_refs(const char *tmpl) {
  for (const char *p = tmpl ? strstr(tmpl, "${") : NULL; p; p = strstr(p + 2, "${")) {
    const char *close = strchr(p + 2, '}');
    if (!close)
      return;
    char name[128];
    size_t n = (size_t)(close - p - 2);
    if (n == 0 || n >= sizeof name)
      continue;
    memcpy(name, p + 2, n);
    name[n] = '\0';
    const char *value = getenv(name);
    if (!value || strlen(value) < 4 || nsecrets == DC_MAX_SECRETS)
      continue;
    int known = 0;
    for (int i = 0; i < nsecrets; i++)
      known |= strcmp(secrets[i], value) == 0;
    if (!known)
      secrets[nsecrets++] = strdup(value);
  }
}

void dc_redact(char *s, size_t size) {
  if (!s)
    return;
  for (int i = 0; i < nsecrets; i++) {
    size_t n = strlen(secrets[i]);
    char *hit;
    while ((hit = strstr(s, secrets[i])) != NULL) {
      size_t tail = strlen(hit + n);
      if ((size_t)(hit - s) + 3 + tail + 1 > size)
        break;
      memmove(hit + 3, hit + n, tail + 1);
      memcpy(hit, "***", 3);
    }
  }
}
