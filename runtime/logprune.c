#include "logprune.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

/* The version in "<target>-<version>-<index>.log" or ".log.1", when name
 * is one of target's logs: copied to out (NUL-terminated); *rotated says
 * which of the two it is. 0 when it is not. */
static int version_of(const char *name, const char *target, char *out, size_t size, int *rotated) {
  size_t nt = strlen(target), n = strlen(name);
  if (n <= nt + 1 || strncmp(name, target, nt) != 0 || name[nt] != '-')
    return 0;
  const char *v = name + nt + 1;
  size_t len = n - nt - 1;
  *rotated = len > 6 && strcmp(v + len - 6, ".log.1") == 0;
  if (*rotated)
    len -= 6;
  else if (len > 4 && strcmp(v + len - 4, ".log") == 0)
    len -= 4;
  else
    return 0;
  size_t digits = 0;
  while (digits < len && v[len - 1 - digits] >= '0' && v[len - 1 - digits] <= '9')
    digits++;
  if (digits == 0 || digits == len || v[len - 1 - digits] != '-')
    return 0;
  len -= digits + 1;
  if (len == 0 || len >= size)
    return 0;
  memcpy(out, v, len);
  out[len] = '\0';
  return 1;
}

static int copy_file(const char *from, const char *to, char *err) {
  char tmp[4096], buf[65536];
  dc_fmt(tmp, sizeof tmp, "%s.tmp", to);
  int in = open(from, O_RDONLY | O_CLOEXEC), out = -1;
  if (in >= 0)
    out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  ssize_t r = 0;
  while (out >= 0 && (r = read(in, buf, sizeof buf)) > 0)
    if (write(out, buf, (size_t)r) != r) {
      r = -1;
      break;
    }
  int failed = in < 0 || out < 0 || r < 0;
  char why[128];
  if (failed)
    dc_fmt(err, DC_ERR_MAX, "deploy: cannot rotate log '%s': %s", from, strerror_r(errno, why, sizeof why));
  if (in >= 0)
    close(in);
  if (out >= 0 && close(out) != 0 && !failed) {
    failed = 1;
    dc_fmt(err, DC_ERR_MAX, "deploy: cannot rotate log '%s': %s", from, strerror_r(errno, why, sizeof why));
  }
  if (!failed && rename(tmp, to) != 0) {
    failed = 1;
    dc_fmt(err, DC_ERR_MAX, "deploy: cannot rotate log '%s': %s", from, strerror_r(errno, why, sizeof why));
  }
  if (failed)
    unlink(tmp);
  return failed ? -1 : 0;
}

int logprune_dir(const char *dir, const char *target, const char *const *drop, size_t ndrop, uint64_t max_bytes,
                 logprune_stats *st, char *err) {
  memset(st, 0, sizeof *st);
  DIR *d = opendir(dir);
  if (!d) {
    if (errno == ENOENT)
      return 0;
    char why[128];
    dc_fmt(err, DC_ERR_MAX, "deploy: cannot read log directory '%s': %s", dir, strerror_r(errno, why, sizeof why));
    return -1;
  }
  int rc = 0;
  time_t now = time(NULL);
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    char version[160], path[4096];
    int rotated = 0;
    if (!version_of(de->d_name, target, version, sizeof version, &rotated))
      continue;
    dc_fmt(path, sizeof path, "%s/%s", dir, de->d_name);
    struct stat sb;
    if (lstat(path, &sb) != 0 || !S_ISREG(sb.st_mode))
      continue;
    int dropped = 0;
    for (size_t i = 0; i < ndrop && !dropped; i++)
      dropped = strcmp(drop[i], version) == 0;
    if (dropped) {
      if (now - sb.st_mtime < LOGPRUNE_MIN_AGE)
        continue;
      if (unlink(path) == 0) {
        st->removed++;
        st->freed += (uint64_t)sb.st_size;
      }
    } else if (!rotated && max_bytes > 0 && (uint64_t)sb.st_size > max_bytes) {
      char old[4200];
      dc_fmt(old, sizeof old, "%s.1", path);
      if (copy_file(path, old, err) != 0) {
        rc = -1;
        continue;
      }
      if (truncate(path, 0) != 0) {
        char why[128];
        dc_fmt(err, DC_ERR_MAX, "deploy: cannot truncate log '%s': %s", path, strerror_r(errno, why, sizeof why));
        rc = -1;
        continue;
      }
      st->rotated++;
    }
  }
  closedir(d);
  return rc;
}
