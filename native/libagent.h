/* SPDX-License-Identifier: Apache-2.0 */
/*
 * libagent: what the Node.js agent cannot do by itself. Network namespace work runs on a
 * short-lived thread so that the calling thread (Node's event loop) never changes namespace,
 * and eBPF objects are loaded, attached and pinned through libbpf.
 *
 * Every function returns a value >= 0 on success and -errno on failure. After a failure,
 * aa_last_error() copies a one-line description of the step that failed, with the path and
 * libbpf's last messages where they exist.
 */
#ifndef AMBIENT_AGENT_LIBAGENT_H
#define AMBIENT_AGENT_LIBAGENT_H

/* Copies the description of the last failure on this thread into out (NUL-terminated).
 * Returns its length.
 */
int aa_last_error(char *out, int out_len);

/*
 * Creates a TCP/IPv4 socket inside the network namespace at netns_path (for example
 * /var/run/netns/pod1 or /proc/PID/ns/net) and returns its file descriptor, close-on-exec.
 * agent_map_fd >= 0 is an open fd of the socket storage map aa_agent_socks: the socket gets its
 * agent flag there before anything else is done with it, so capture lets it through; -1 leaves
 * it unflagged, like an application's socket. SO_REUSEADDR is always set. mark != 0 sets SO_MARK,
 * transparent != 0 sets IP_TRANSPARENT. The socket is bound when bind_ip is not empty or
 * port > 0 (an empty bind_ip means 0.0.0.0), and listens when backlog > 0.
 */
int aa_netns_socket(const char *netns_path, int agent_map_fd, int mark, const char *bind_ip,
		    int port, int backlog, int transparent);

/*
 * Creates count (1 to 1024) unconnected TCP/IPv4 sockets inside the network namespace at
 * netns_path in one visit, as aa_netns_socket does with no bind and no listen: close-on-exec,
 * SO_REUSEADDR, SO_MARK when mark != 0, and flagged in aa_agent_socks when agent_map_fd >= 0.
 * Writes their file descriptors to fds_out (room for count ints) and returns count. On a
 * failure it closes the sockets it made, so nothing in fds_out needs closing.
 */
int aa_netns_sockets(const char *netns_path, int agent_map_fd, int mark, int count, int *fds_out);

/* Writes the cookie of the network namespace at netns_path to cookie_out (8 bytes, host
 * byte order), as getsockopt(SO_NETNS_COOKIE) reports it. Returns 0.
 */
int aa_netns_cookie(const char *netns_path, unsigned char *cookie_out);

/* Writes the IPv4 addresses of every interface in the network namespace at netns_path to
 * out as a comma-separated, NUL-terminated string (loopback included). Returns its length,
 * or -ENOSPC when out_len is too small.
 */
int aa_netns_ipv4_addresses(const char *netns_path, char *out, int out_len);

/*
 * Loads the eBPF object at object_path with every map pinned at <pin_root>/maps/<name>
 * (an existing pin is reused, so map contents survive an agent restart), then attaches every
 * cgroup program to the cgroup v2 directory cgroup_path with a bpf_link pinned at
 * <pin_root>/links/<program name>. When that link pin already exists, the link's program is
 * replaced in place, so the hook stays attached throughout. Links coexist with programs that
 * other users attached to the same cgroup.
 *
 * sk_lookup programs are linked per network namespace (aa_netns_link), so they are pinned at
 * <pin_root>/progs/<program name> instead, and every link pinned at
 * <pin_root>/links/sk_lookup-* is moved to the new program; the pins of links whose namespace
 * is gone are removed. Returns the number of cgroup programs attached.
 */
int aa_capture_attach(const char *object_path, const char *pin_root, const char *cgroup_path);

/* Links the sk_lookup program pinned at program_pin_path to the network namespace at
 * netns_path and pins the link at link_pin_path, so it outlives this process. Returns 0 when
 * it created the link, and 1, with no change, when link_pin_path already exists.
 */
int aa_netns_link(const char *program_pin_path, const char *netns_path, const char *link_pin_path);

/* Loads the eBPF object at object_path without pinning or attaching anything, then unloads
 * it: a check that this kernel accepts every program. Returns 0.
 */
int aa_capture_probe(const char *object_path);

/* Map access by pin path. aa_map_open returns a file descriptor; the others take it. */
int aa_map_open(const char *pin_path);
int aa_map_update(int map_fd, const unsigned char *key, const unsigned char *value);
int aa_map_delete(int map_fd, const unsigned char *key);
int aa_map_lookup(int map_fd, const unsigned char *key, unsigned char *value_out);
int aa_map_lookup_and_delete(int map_fd, const unsigned char *key, unsigned char *value_out);
/* Writes the key after key (the first key when has_key == 0) to next_out; -ENOENT at the end. */
int aa_map_next_key(int map_fd, const unsigned char *key, int has_key, unsigned char *next_out);

/* Closes a file descriptor returned by this library. */
int aa_close(int fd);

#endif /* AMBIENT_AGENT_LIBAGENT_H */
