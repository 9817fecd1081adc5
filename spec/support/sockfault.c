/* sockfault: a proxy that puts faults between deployctl and a real server
 * (spec/faults_spec.lua): HAProxy's stats socket, a git daemon. The server
 * itself runs; only the way to it misbehaves, the way a loaded or dying
 * HAProxy, a restart or a network that drops a connection does.
 *
 *   sockfault LISTEN UPSTREAM MODEFILE
 *
 * LISTEN and UPSTREAM are a unix socket path or tcp:HOST:PORT. For each
 * connection it reads MODEFILE (one word; missing: pass):
 *   pass     relay both ways until one side closes
 *   cut:N    relay both ways, and reset the connection once N bytes of the
 *            server's answer went through (a fetch cut in the middle)
 *   hang     read the command and never answer (the router's timeout)
 *   garbage  answer bytes that are no HAProxy answer, then close
 *   partial  relay the command, send back the first half of the answer
 *            only, then close (an answer cut short)
 *   reset    read the command, then reset the connection (RST)
 *   refuse   close at once, before reading anything
 *   stat     answer "show stat ..." with the text of MODEFILE.answer (counters
 *            a real HAProxy would not give), relay every other command
 * and appends "<mode> <first line of the command>" to MODEFILE.log, so a
 * spec can see which commands met the fault. One process per connection. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *upstream, *modefile;

/* A socket address from "tcp:HOST:PORT" (IPv4) or a unix socket path. */
static socklen_t address(const char *spec, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof *ss);
  if (strncmp(spec, "tcp:", 4) == 0) {
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    char host[64];
    const char *colon = strrchr(spec + 4, ':');
    if (!colon || (size_t)(colon - spec - 4) >= sizeof host)
      return 0;
    memcpy(host, spec + 4, (size_t)(colon - spec - 4));
    host[colon - spec - 4] = 0;
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &in->sin_addr) != 1)
      return 0;
    return sizeof *in;
  }
  struct sockaddr_un *un = (struct sockaddr_un *)ss;
  un->sun_family = AF_UNIX;
  snprintf(un->sun_path, sizeof un->sun_path, "%s", spec);
  return sizeof *un;
}

static int upstream_connect(void) {
  struct sockaddr_storage ss;
  socklen_t len = address(upstream, &ss);
  int fd = len ? socket(ss.ss_family, SOCK_STREAM, 0) : -1;
  if (fd < 0 || connect(fd, (struct sockaddr *)&ss, len) != 0) {
    if (fd >= 0)
      close(fd);
    return -1;
  }
  return fd;
}

static void reset_close(int fd) {
  struct linger l = {.l_onoff = 1, .l_linger = 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  close(fd);
}

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Both ways until either side closes; with limit > 0, the client's
 * connection is reset once limit bytes of the answer went through. */
static void relay(int c, int u, long limit) {
  long down = 0;
  char buf[16384];
  struct pollfd p[2] = {{.fd = c, .events = POLLIN}, {.fd = u, .events = POLLIN}};
  while (poll(p, 2, 120000) > 0) {
    if (p[0].revents) {
      ssize_t r = read(c, buf, sizeof buf);
      if (r <= 0 || write(u, buf, (size_t)r) < 0)
        break;
    }
    if (p[1].revents) {
      ssize_t r = read(u, buf, sizeof buf);
      if (r <= 0)
        break;
      if (limit > 0 && down + r >= limit) {
        write_all(c, buf, (size_t)(limit - down));
        reset_close(c);
        close(u);
        return;
      }
      down += r;
      if (write(c, buf, (size_t)r) < 0)
        break;
    }
  }
  close(c);
  close(u);
}

static void read_mode(char *mode, size_t n) {
  snprintf(mode, n, "pass");
  FILE *f = fopen(modefile, "r");
  if (!f)
    return;
  if (fscanf(f, "%31s", mode) != 1)
    snprintf(mode, n, "pass");
  fclose(f);
}

/* The command: what arrives until a newline, or until the peer stops
 * writing for 200 ms (HAProxy's non-interactive mode takes one line). */
static size_t read_command(int fd, char *buf, size_t cap) {
  size_t len = 0;
  while (len < cap - 1) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 200) <= 0)
      break;
    ssize_t r = read(fd, buf + len, cap - 1 - len);
    if (r <= 0)
      break;
    len += (size_t)r;
    if (memchr(buf, '\n', len))
      break;
  }
  buf[len] = 0;
  return len;
}

static void log_command(const char *mode, const char *cmd) {
  char path[4096];
  snprintf(path, sizeof path, "%s.log", modefile);
  FILE *f = fopen(path, "a");
  if (!f)
    return;
  size_t n = strcspn(cmd, "\r\n");
  fprintf(f, "%s %.*s\n", mode, (int)n, cmd);
  fclose(f);
}

static void serve(int c) {
  char mode[32], cmd[8192];
  read_mode(mode, sizeof mode);
  if (strcmp(mode, "pass") == 0 || strncmp(mode, "cut:", 4) == 0) {
    log_command(mode, "");
    int u = upstream_connect();
    if (u < 0) {
      close(c);
      return;
    }
    relay(c, u, mode[0] == 'c' ? atol(mode + 4) : 0);
    return;
  }
  if (strcmp(mode, "refuse") == 0) {
    log_command(mode, "");
    close(c);
    return;
  }
  size_t len = read_command(c, cmd, sizeof cmd);
  log_command(mode, cmd);
  if (strcmp(mode, "hang") == 0) {
    /* held open until the client gives up (or 120 s) */
    struct pollfd p = {.fd = c, .events = POLLIN};
    char sink[256];
    while (poll(&p, 1, 120000) > 0 && read(c, sink, sizeof sink) > 0)
      ;
    close(c);
    return;
  }
  if (strcmp(mode, "garbage") == 0) {
    /* complete as an answer (it ends with an empty line), but not HAProxy's */
    static const char junk[] = "\x01\xff\xfe<html>502 Bad Gateway</html>\n# not a stats answer\x7f\n\n";
    write_all(c, junk, sizeof junk - 1);
    close(c);
    return;
  }
  if (strcmp(mode, "reset") == 0) {
    reset_close(c);
    return;
  }
  if (strcmp(mode, "stat") == 0 && strncmp(cmd, "show stat ", 10) == 0) {
    char path[4096];
    snprintf(path, sizeof path, "%s.answer", modefile);
    FILE *f = fopen(path, "r");
    char buf[16384];
    size_t r = f ? fread(buf, 1, sizeof buf, f) : 0;
    if (f)
      fclose(f);
    write_all(c, buf, r);
    close(c);
    return;
  }
  int u = upstream_connect(); /* partial, or stat's other commands */
  if (u < 0) {
    close(c);
    return;
  }
  write_all(u, cmd, len);
  /* the answer, whole: HAProxy closes after one non-interactive command */
  size_t cap = 1 << 16, n = 0;
  char *ans = malloc(cap);
  for (;;) {
    if (n == cap) {
      cap *= 2;
      ans = realloc(ans, cap);
    }
    ssize_t r = read(u, ans + n, cap - n);
    if (r <= 0)
      break;
    n += (size_t)r;
  }
  close(u);
  write_all(c, ans, strcmp(mode, "stat") == 0 ? n : n / 2);
  free(ans);
  close(c);
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: sockfault LISTEN UPSTREAM MODEFILE\n");
    return 2;
  }
  upstream = argv[2];
  modefile = argv[3];
  signal(SIGPIPE, SIG_IGN);
  signal(SIGCHLD, SIG_IGN); /* children reaped by the kernel */
  struct sockaddr_storage ss;
  socklen_t len = address(argv[1], &ss);
  int s = len ? socket(ss.ss_family, SOCK_STREAM, 0) : -1, one = 1;
  if (ss.ss_family == AF_UNIX)
    unlink(argv[1]);
  else
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (s < 0 || bind(s, (struct sockaddr *)&ss, len) != 0 || listen(s, 64) != 0) {
    perror("sockfault: listen");
    return 1;
  }
  printf("listening\n");
  fflush(stdout);
  for (;;) {
    int c = accept(s, NULL, NULL);
    if (c < 0) {
      if (errno == EINTR)
        continue;
      perror("sockfault: accept");
      return 1;
    }
    pid_t pid = fork();
    if (pid == 0) {
      close(s);
      serve(c);
      _exit(0);
    }
    close(c);
  }
}
