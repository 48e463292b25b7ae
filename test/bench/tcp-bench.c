// The benchmark's TCP application: an echo server for the server pod and the latency, connection
// rate and idle-connection clients for the client pod. It is C so that the application's own
// overhead stays small next to what the mesh adds. On the 2-core benchmark VM, a 1 KiB round trip
// on loopback took about 62 µs with a Node.js echo server and about 13 µs with this one.
//
//   tcp-bench server PORT
//       echoes every byte on every connection (epoll, one thread), until SIGTERM.
//   tcp-bench latency HOST PORT SIZE WARMUP COUNT
//       one connection, WARMUP then COUNT sequential round trips of SIZE bytes each way; prints
//       {"samples_us":[...]} with the COUNT recorded round-trip times.
//   tcp-bench rate HOST PORT THREADS SECONDS MAX
//       THREADS loops that each connect, send 1 byte, wait for the echo and close, until SECONDS
//       pass or MAX connections are done; prints {"completed","errors","elapsed_s","error_codes"}.
//   tcp-bench connect HOST PORT INTERVAL_US COUNT THREADS
//       COUNT connections at a fixed pace, open loop: connection i is scheduled at i * INTERVAL_US
//       after the start. THREADS threads take the connections in order, so a connection starts on
//       time unless all threads are still busy with earlier ones, and then at once when one is free.
//       Each connects, sends 1 byte, reads the echo and closes. Prints {"samples_us":[...],"late",
//       "max_late_us","elapsed_s","errors","error_codes"}: the time from connect() to the echo of
//       each completed connection in schedule order, and how many started more than LATE_US late.
//   tcp-bench idle HOST PORT COUNT
//       opens COUNT connections one after another, each with a 1-byte echo so that it is
//       established end to end; prints {"opened","failed"}, keeps them open until a line arrives on
//       stdin, then closes them and prints {"closed"}.
//
// Arguments after the mode's own are ignored: the benchmark appends the run's prefix there, so that
// a later run can recognise and end a process that a crashed run left behind.

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

// A step (connect, send, receive) that makes no progress in this time fails.
#define STEP_TIMEOUT_S 10
#define MAX_ERRNO 256
// A connection of the connect mode that starts later than this after its scheduled time counts as late.
#define LATE_US 1000

static struct sockaddr_in target;

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
  fprintf(stderr, "tcp-bench: %s failed: %s\n", what, strerror(errno));
  exit(1);
}

static void parse_target(const char *host, const char *port) {
  target.sin_family = AF_INET;
  target.sin_port = htons((uint16_t)atoi(port));
  if (inet_pton(AF_INET, host, &target.sin_addr) != 1) {
    fprintf(stderr, "tcp-bench: invalid IPv4 address %s\n", host);
    exit(2);
  }
}

// Returns a connected socket with Nagle off and step timeouts set, or -1 with errno set.
static int connect_target(void) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  int one = 1;
  struct timeval timeout = {.tv_sec = STEP_TIMEOUT_S};
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  if (connect(fd, (struct sockaddr *)&target, sizeof target) != 0) {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
  }
  return fd;
}

// Reads exactly `size` bytes; returns 0, or -1 with errno set (ECONNRESET when the peer closed).
static int read_exact(int fd, char *buffer, size_t size) {
  size_t got = 0;
  while (got < size) {
    ssize_t n = read(fd, buffer + got, size - got);
    if (n == 0) errno = ECONNRESET;
    if (n <= 0) return -1;
    got += (size_t)n;
  }
  return 0;
}

static int write_all(int fd, const char *buffer, size_t size) {
  size_t sent = 0;
  while (sent < size) {
    ssize_t n = write(fd, buffer + sent, size - sent);
    if (n < 0 && errno == EAGAIN) {
      struct pollfd writable = {.fd = fd, .events = POLLOUT};
      if (poll(&writable, 1, STEP_TIMEOUT_S * 1000) <= 0) return -1;
      continue;
    }
    if (n <= 0) return -1;
    sent += (size_t)n;
  }
  return 0;
}

// Echoes what is readable on `fd`; closes it at end of stream or on error.
static void echo_readable(int epoll_fd, int fd) {
  char buffer[65536];
  for (;;) {
    ssize_t n = read(fd, buffer, sizeof buffer);
    if (n > 0 && write_all(fd, buffer, (size_t)n) == 0) continue;
    if (n < 0 && errno == EAGAIN) return;
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    return;
  }
}

static void accept_pending(int epoll_fd, int listener) {
  for (;;) {
    int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct epoll_event event = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) != 0) close(fd);
  }
}

static _Noreturn void run_server(int port) {
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0) die("bind");
  if (listen(listener, 4096) != 0) die("listen");
  int epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event event = {.events = EPOLLIN, .data.fd = listener};
  if (epoll_fd < 0 || epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listener, &event) != 0) die("epoll");
  printf("listening\n");
  fflush(stdout);
  struct epoll_event events[256];
  for (;;) {
    int ready = epoll_wait(epoll_fd, events, 256, -1);
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) die("epoll_wait");
    for (int i = 0; i < ready; i++) {
      if (events[i].data.fd == listener) accept_pending(epoll_fd, listener);
      else echo_readable(epoll_fd, events[i].data.fd);
    }
  }
}

static int run_latency(size_t size, int warmup, int count) {
  int fd = connect_target();
  if (fd < 0) die("connect");
  char *buffer = malloc(size);
  double *samples = malloc(sizeof(double) * (size_t)count);
  memset(buffer, 'a', size);
  for (int i = 0; i < warmup + count; i++) {
    double started = now_seconds();
    if (write_all(fd, buffer, size) != 0) die("write");
    if (read_exact(fd, buffer, size) != 0) die("read");
    if (i >= warmup) samples[i - warmup] = (now_seconds() - started) * 1e6;
  }
  close(fd);
  printf("{\"samples_us\":[");
  for (int i = 0; i < count; i++) printf("%s%.2f", i > 0 ? "," : "", samples[i]);
  printf("]}\n");
  return 0;
}

// Failed connections: the total and the count per errno value (0 for values out of range).
struct error_tally {
  atomic_long total;
  atomic_long counts[MAX_ERRNO];
};

struct rate_state {
  double deadline;
  long max_count;
  atomic_long started;
  atomic_long completed;
  struct error_tally errors;
};

static void count_error(struct error_tally *tally, int error) {
  atomic_fetch_add(&tally->total, 1);
  atomic_fetch_add(&tally->counts[error > 0 && error < MAX_ERRNO ? error : 0], 1);
}

// Prints "errors":N,"error_codes":{NAME:COUNT,...} for the errno values that occurred.
static void print_errors(struct error_tally *tally) {
  printf("\"errors\":%ld,\"error_codes\":{", atomic_load(&tally->total));
  const char *separator = "";
  for (int error = 0; error < MAX_ERRNO; error++) {
    long n = atomic_load(&tally->counts[error]);
    if (n == 0) continue;
    const char *name = error > 0 ? strerrorname_np(error) : NULL;
    printf("%s\"%s\":%ld", separator, name ? name : "unknown", n);
    separator = ",";
  }
  printf("}");
}

static void *rate_loop(void *argument) {
  struct rate_state *state = argument;
  char byte = '1';
  while (now_seconds() < state->deadline && atomic_fetch_add(&state->started, 1) < state->max_count) {
    int fd = connect_target();
    if (fd < 0) {
      count_error(&state->errors, errno);
      continue;
    }
    if (write_all(fd, &byte, 1) == 0 && read_exact(fd, &byte, 1) == 0) atomic_fetch_add(&state->completed, 1);
    else count_error(&state->errors, errno);
    close(fd);
  }
  return NULL;
}

static int run_rate(int threads, double seconds, long max_count) {
  static struct rate_state state;
  double started = now_seconds();
  state.deadline = started + seconds;
  state.max_count = max_count;
  pthread_t ids[256];
  if (threads < 1 || threads > 256) threads = 16;
  for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, rate_loop, &state);
  for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
  double elapsed = now_seconds() - started;
  printf("{\"completed\":%ld,\"elapsed_s\":%.4f,", atomic_load(&state.completed), elapsed);
  print_errors(&state.errors);
  printf("}\n");
  return 0;
}

// Sleeps until `deadline` (CLOCK_MONOTONIC seconds); returns at once when it has passed.
static void sleep_until(double deadline) {
  struct timespec ts = {.tv_sec = (time_t)deadline, .tv_nsec = (long)((deadline - (double)(time_t)deadline) * 1e9)};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
  }
}

struct connect_state {
  double started;
  double interval_s;
  long count;
  atomic_long next;
  // Time from connect() to the echo of connection i, µs, or -1 when it failed.
  double *samples;
  atomic_long late;
  atomic_long max_late_us;
  struct error_tally errors;
};

static void record_lateness(struct connect_state *state, long late_us) {
  if (late_us > LATE_US) atomic_fetch_add(&state->late, 1);
  long seen = atomic_load(&state->max_late_us);
  while (late_us > seen && !atomic_compare_exchange_weak(&state->max_late_us, &seen, late_us)) {
  }
}

// Takes the next connection index, waits for its scheduled time, and runs it, until COUNT are taken.
static void *connect_loop(void *argument) {
  struct connect_state *state = argument;
  char byte = '1';
  for (long i = atomic_fetch_add(&state->next, 1); i < state->count; i = atomic_fetch_add(&state->next, 1)) {
    double scheduled = state->started + (double)i * state->interval_s;
    sleep_until(scheduled);
    double begin = now_seconds();
    record_lateness(state, (long)((begin - scheduled) * 1e6));
    state->samples[i] = -1;
    int fd = connect_target();
    if (fd < 0) {
      count_error(&state->errors, errno);
      continue;
    }
    if (write_all(fd, &byte, 1) == 0 && read_exact(fd, &byte, 1) == 0) state->samples[i] = (now_seconds() - begin) * 1e6;
    else count_error(&state->errors, errno);
    close(fd);
  }
  return NULL;
}

static int run_connect(double interval_us, long count, int threads) {
  static struct connect_state state;
  state.interval_s = interval_us / 1e6;
  state.count = count > 0 ? count : 0;
  state.samples = malloc(sizeof(double) * (size_t)(state.count > 0 ? state.count : 1));
  if (state.samples == NULL) die("malloc");
  pthread_t ids[256];
  if (threads < 1 || threads > 256) threads = 8;
  state.started = now_seconds();
  for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, connect_loop, &state);
  for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
  double elapsed = now_seconds() - state.started;
  printf("{\"samples_us\":[");
  const char *separator = "";
  for (long i = 0; i < state.count; i++) {
    if (state.samples[i] < 0) continue;
    printf("%s%.1f", separator, state.samples[i]);
    separator = ",";
  }
  printf("],\"late\":%ld,\"max_late_us\":%ld,\"elapsed_s\":%.4f,", atomic_load(&state.late), atomic_load(&state.max_late_us), elapsed);
  print_errors(&state.errors);
  printf("}\n");
  return 0;
}

static int run_idle(int count) {
  int *fds = calloc((size_t)count, sizeof(int));
  int opened = 0;
  int failed = 0;
  char byte = '1';
  for (int i = 0; i < count; i++) {
    int fd = connect_target();
    if (fd >= 0 && write_all(fd, &byte, 1) == 0 && read_exact(fd, &byte, 1) == 0) {
      fds[opened++] = fd;
      continue;
    }
    if (fd >= 0) close(fd);
    failed++;
  }
  printf("{\"opened\":%d,\"failed\":%d}\n", opened, failed);
  fflush(stdout);
  char line[64];
  if (fgets(line, sizeof line, stdin) == NULL) line[0] = '\0';
  for (int i = 0; i < opened; i++) close(fds[i]);
  printf("{\"closed\":%d}\n", opened);
  return 0;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  const char *mode = argc > 1 ? argv[1] : "";
  if (strcmp(mode, "server") == 0 && argc >= 3) run_server(atoi(argv[2]));
  if (strcmp(mode, "latency") == 0 && argc >= 7) {
    parse_target(argv[2], argv[3]);
    return run_latency((size_t)atol(argv[4]), atoi(argv[5]), atoi(argv[6]));
  }
  if (strcmp(mode, "rate") == 0 && argc >= 7) {
    parse_target(argv[2], argv[3]);
    return run_rate(atoi(argv[4]), atof(argv[5]), atol(argv[6]));
  }
  if (strcmp(mode, "connect") == 0 && argc >= 7) {
    parse_target(argv[2], argv[3]);
    return run_connect(atof(argv[4]), atol(argv[5]), atoi(argv[6]));
  }
  if (strcmp(mode, "idle") == 0 && argc >= 5) {
    parse_target(argv[2], argv[3]);
    return run_idle(atoi(argv[4]));
  }
  fprintf(stderr, "usage: tcp-bench server PORT | latency HOST PORT SIZE WARMUP COUNT | rate HOST PORT THREADS SECONDS MAX | connect HOST PORT INTERVAL_US COUNT THREADS | idle HOST PORT COUNT\n");
  return 2;
}
