#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <sys/random.h>

volatile sig_atomic_t dc_interrupts;
volatile sig_atomic_t dc_interrupt_owners;

char *dc_vfmt(char *dst, size_t size, const char *fmt, va_list ap) {
  if (size == 0)
    return dst;
  int n = vsnprintf(dst, size, fmt, ap);
  if (n < 0)
    dst[0] = '\0';
  return dst;
}

void dc_errf(char *err, const char *fmt, ...) {
  if (!err)
    return;
  va_list ap;
  va_start(ap, fmt);
  dc_vfmt(err, DC_ERR_MAX, fmt, ap);
  va_end(ap);
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

double dc_round_ms(double seconds) { return (double)llround(seconds * 1000.0) / 1000.0; }

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

char *dc_expand_placeholders_dup(const char *tmpl, const char *const *pairs) {
  dc_buf b = {0};
  for (const char *p = tmpl; *p;) {
    const char *close = (*p == '{') ? strchr(p + 1, '}') : NULL;
    const char *value = close ? lookup_pair(pairs, p + 1, (size_t)(close - p - 1)) : NULL;
    if (value && !(p > tmpl && p[-1] == '$')) {
      dc_buf_puts(&b, value);
      p = close + 1;
      continue;
    }
    dc_buf_add(&b, p, 1);
    p++;
  }
  return dc_buf_take(&b);
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
  /* A version lands in paths and in argv: ".", ".." and "-v" must not. */
  if (!isalnum((unsigned char)v[0])) {
    dc_fmt(err, DC_ERR_MAX, "deploy: %s '%.40s' must start with a letter or a digit (it becomes part of file "
           "names and command lines): e.g. '1.4.2'", what, v);
    return -1;
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

void dc_new_id(char *buf, size_t size) {
  unsigned char rnd[3] = {0, 0, 0};
  if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
    unsigned v = (unsigned)getpid() ^ (unsigned)(dc_wall_now() * 1e6);
    memcpy(rnd, &v, sizeof rnd);
  }
  unsigned long long ms = (unsigned long long)(dc_wall_now() * 1000.0);
  dc_fmt(buf, size, "d%012llx%02x%02x%02x", ms, rnd[0], rnd[1], rnd[2]);
}

/* ---- secrets ---- */

static char **secrets;
static size_t nsecrets, secrets_cap;

size_t dc_secret_count(void) { return nsecrets; }

int dc_secret_add(const char *value) {
  if (!value || strlen(value) < 4)
    return 0;
  for (size_t i = 0; i < nsecrets; i++)
    if (strcmp(secrets[i], value) == 0)
      return 0;
  if (nsecrets == secrets_cap) {
    size_t cap = secrets_cap ? secrets_cap * 2 : 16;
    char **g = realloc(secrets, cap * sizeof *g);
    if (!g)
      return -1;
    secrets = g;
    secrets_cap = cap;
  }
  char *copy = strdup(value);
  if (!copy)
    return -1;
  /* Longest first: a secret that contains another is replaced whole. */
  size_t at = nsecrets;
  while (at > 0 && strlen(secrets[at - 1]) < strlen(copy)) {
    secrets[at] = secrets[at - 1];
    at--;
  }
  secrets[at] = copy;
  nsecrets++;
  return 0;
}

int dc_secret_note_refs(const char *tmpl) {
  int rc = 0;
  for (const char *p = tmpl ? strstr(tmpl, "${") : NULL; p; p = strstr(p + 2, "${")) {
    const char *close = strchr(p + 2, '}');
    if (!close)
      break;
    char name[128];
    size_t n = (size_t)(close - p - 2);
    if (n == 0 || n >= sizeof name)
      continue;
    memcpy(name, p + 2, n);
    name[n] = '\0';
    if (dc_secret_add(getenv(name)) != 0)
      rc = -1;
  }
  return rc;
}

void dc_redact(char *s) {
  if (!s)
    return;
  for (size_t i = 0; i < nsecrets; i++) {
    size_t n = strlen(secrets[i]);
    char *hit;
    while ((hit = strstr(s, secrets[i])) != NULL) {
      memmove(hit + 3, hit + n, strlen(hit + n) + 1);
      memcpy(hit, "***", 3);
    }
  }
}

/* ---- growable strings ---- */

void dc_buf_add(dc_buf *b, const char *s, size_t n) {
  if (b->oom)
    return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + n + 1)
      cap *= 2;
    char *g = realloc(b->data, cap);
    if (!g) {
      b->oom = 1;
      return;
    }
    b->data = g;
    b->cap = cap;
  }
  memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = '\0';
}

void dc_buf_puts(dc_buf *b, const char *s) { dc_buf_add(b, s, strlen(s)); }

void dc_buf_printf(dc_buf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0 || b->oom)
    return;
  char *tmp = malloc((size_t)n + 1);
  if (!tmp) {
    b->oom = 1;
    return;
  }
  va_start(ap, fmt);
  vsnprintf(tmp, (size_t)n + 1, fmt, ap);
  va_end(ap);
  dc_buf_add(b, tmp, (size_t)n);
  free(tmp);
}

char *dc_buf_take(dc_buf *b) {
  if (b->oom) {
    dc_buf_free(b);
    return NULL;
  }
  if (!b->data)
    return strdup("");
  char *s = b->data;
  b->data = NULL;
  b->len = b->cap = 0;
  return s;
}

void dc_buf_free(dc_buf *b) {
  free(b->data);
  memset(b, 0, sizeof *b);
}

size_t dc_utf8_len(const unsigned char *p) {
  unsigned c = p[0];
  if (c < 0x80)
    return 1;
  size_t n = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 ? 2 : 0;
  if (n == 0 || c > 0xf4)
    return 0;
  for (size_t i = 1; i < n; i++)
    if ((p[i] & 0xc0) != 0x80)
      return 0;
  if (n == 3 && ((c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] >= 0xa0)))
    return 0;
  if (n == 4 && ((c == 0xf0 && p[1] < 0x90) || (c == 0xf4 && p[1] >= 0x90)))
    return 0;
  return n;
}

char *dc_printable(const char *s) {
  dc_buf b = {0};
  for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
    size_t n = *p >= 0x80 ? dc_utf8_len(p) : 1;
    /* valid UTF-8 passes, except C1 controls (U+0080..U+009F: \xc2\x80..\x9f,
     * CSI among them); a byte of no valid sequence is escaped */
    if (n > 1 && !(p[0] == 0xc2 && p[1] < 0xa0)) {
      dc_buf_add(&b, (const char *)p, n);
      p += n - 1;
    } else if (*p >= 0x80) {
      dc_buf_printf(&b, "\\x%02x", *p);
    } else if (*p == '\n')
      dc_buf_puts(&b, "\\n");
    else if (*p == '\t')
      dc_buf_puts(&b, "\\t");
    else if (*p == '\r')
      dc_buf_puts(&b, "\\r");
    else if (*p < 0x20 || *p == 0x7f)
      dc_buf_printf(&b, "\\x%02x", *p);
    else
      dc_buf_add(&b, (const char *)p, 1);
  }
  return dc_buf_take(&b);
}

const char *dc_unprefix(const char *msg) {
  static const char prefix[] = "deploy: ";
  if (!msg)
    return "";
  while (strncmp(msg, prefix, sizeof prefix - 1) == 0)
    msg += sizeof prefix - 1;
  return msg;
}

void dc_redact_url(char *dst, size_t size, const char *url) {
  const char *auth = strstr(url, "://");
  auth = auth ? auth + 3 : url;
  size_t host_off = strcspn(auth, "/?#");
  const char *at = memchr(auth, '@', host_off);
  const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
  if (!colon) {
    dc_strlcpy(dst, url, size);
    return;
  }
  dc_fmt(dst, size, "%.*s:***%s", (int)(colon - url), url, at);
}
