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
 * Sets the proc root: the folder where the host's procfs is mounted (default /proc). Every
 * per-namespace sysctl this library writes is opened as <dir>/sys/net/..., from a thread inside
 * the namespace. Trailing slashes are dropped. Call it once, before any other function, because
 * helper threads read it without a lock. Fails with -EINVAL for a relative path and with
 * -ENAMETOOLONG for a path longer than about 4000 bytes.
 */
int aa_set_proc_root(const char *dir);

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

/* Flags of aa_netns_listener. */
/* Sets SO_REUSEPORT, so that a second listener of the same user can join the port while the
 * first still listens, as a replacement agent does during a hand-over.
 */
#define AA_LISTENER_REUSEPORT 0x1
/* Sets net.ipv4.tcp_migrate_req=1 in the namespace first (Linux 5.14 or later; older kernels
 * are left as they are), so that connections queued on a closing listener move to another
 * listener of its SO_REUSEPORT group instead of being reset.
 */
#define AA_LISTENER_MIGRATE_REQUESTS 0x2
/* Makes the listener TCP/IPv6 with IPV6_V6ONLY, as aa_netns_socket6 does; bind_ip is then an
 * IPv6 address (empty means ::).
 */
#define AA_LISTENER_IPV6 0x4

/*
 * Creates a listening TCP/IPv4 socket (TCP/IPv6 with AA_LISTENER_IPV6) inside the network
 * namespace at netns_path, as aa_netns_socket does with port > 0 and backlog > 0, plus the
 * AA_LISTENER_* flags. Returns its file descriptor.
 */
int aa_netns_listener(const char *netns_path, int agent_map_fd, int mark, const char *bind_ip,
		      int port, int backlog, int flags);

/* Sets (on != 0) or clears SO_REUSEPORT on the socket fd, for example an agent's listener that a
 * replacement agent is about to join. Returns 0.
 */
int aa_socket_set_reuseport(int fd, int on);

/* Writes the cookie of the network namespace at netns_path to cookie_out (8 bytes, host
 * byte order), as getsockopt(SO_NETNS_COOKIE) reports it. Returns 0.
 */
int aa_netns_cookie(const char *netns_path, unsigned char *cookie_out);

/*
 * aa_netns_socket and aa_netns_sockets for TCP/IPv6: the sockets are AF_INET6 with IPV6_V6ONLY
 * set, so that an IPv6 listener and an IPv4 one can share a port. An empty bind_ip means ::.
 * Fails with -EAFNOSUPPORT where the kernel has no IPv6.
 */
int aa_netns_socket6(const char *netns_path, int agent_map_fd, int mark, const char *bind_ip,
		     int port, int backlog);
int aa_netns_sockets6(const char *netns_path, int agent_map_fd, int mark, int count, int *fds_out);

/* Writes the IPv4 addresses of every interface in the network namespace at netns_path to
 * out as a comma-separated, NUL-terminated string (loopback included). Returns its length,
 * or -ENOSPC when out_len is too small.
 */
int aa_netns_ipv4_addresses(const char *netns_path, char *out, int out_len);

/* aa_netns_ipv4_addresses for IPv6: the IPv6 addresses of every interface (::1 and fe80::
 * addresses included), in the compressed text form of inet_ntop. A namespace whose IPv6 is
 * disabled (net.ipv6.conf.all.disable_ipv6=1) has none.
 */
int aa_netns_ipv6_addresses(const char *netns_path, char *out, int out_len);

/*
 * Installs (install != 0) or removes the policy routing that source-address transparency needs
 * in the network namespace at netns_path: the rule `fwmark mark/mask lookup table` at the given
 * priority, and the route `local 0.0.0.0/0 dev lo` in that table. Installing also sets the
 * namespace's net.ipv4.tcp_fwmark_accept to 1; removing leaves it. Entries already present on
 * install, or already gone on removal, count as done, so both are safe to repeat. Returns how
 * many of the rule and route it added or deleted (0 to 2).
 */
int aa_netns_transparent_routing(const char *netns_path, int mark, int mask, int table, int priority,
				 int install);

/*
 * aa_netns_transparent_routing for IPv6: the IPv6 rule and the route `local ::/0 dev lo`.
 * net.ipv4.tcp_fwmark_accept covers TCP over IPv6 as well. Installing fails with -EAFNOSUPPORT
 * when the kernel has no IPv6 and with -EACCES when IPv6 is disabled on lo in the namespace.
 * Removing in a kernel without IPv6 returns 0.
 */
int aa_netns_transparent_routing6(const char *netns_path, int mark, int mask, int table,
				  int priority, int install);

/*
 * Prepares the unconnected TCP socket fd (IPv4 or IPv6) to connect from a client's address.
 * Sets SO_MARK to mark and IP_TRANSPARENT (IPV6_TRANSPARENT for IPv6), then binds fd to ip, an
 * address of the socket's family, with a port that the kernel picks. Works on any thread,
 * because the socket keeps the namespace it was made in. Returns the bound port, or 0 when that
 * port is avoid_port (the socket is then bound and of no further use).
 */
int aa_socket_bind_transparent(int fd, int mark, const char *ip, int avoid_port);

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

/*
 * Probes every kernel feature eBPF capture needs by using it: creates each map type, loads each
 * program of the object at object_path and links it to a throwaway cgroup under cgroup_path or a
 * throwaway network namespace. Then it removes all of them. Writes one line per feature to out,
 * "name<TAB>errno<TAB>detail", where errno 0 means the feature works. Returns the text's length.
 */
int aa_capture_probe_features(const char *object_path, const char *cgroup_path, char *out, int out_len);

/*
 * Writes the destination that a connection accepted on fd had before netfilter NAT (REDIRECT)
 * rewrote it, as read with SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6), to ip_out
 * (at least INET6_ADDRSTRLEN bytes). Returns the port, or -ENOENT when conntrack has no entry.
 */
int aa_original_dst(int fd, char *ip_out, int ip_len);

/* Returns 0 when libnftables (libnftables.so.1) can be loaded, and -ENOENT or -ENOSYS otherwise. */
int aa_nft_available(void);

/*
 * Runs an nftables script (the syntax of `nft -f`) inside the network namespace at netns_path,
 * through libnftables on a helper thread. The script is one transaction. Copies the output of
 * nftables (a listing, for list commands) to out when out is not NULL, and returns its length.
 * Fails with -EINVAL and nftables' message when it rejected the script, and with -ENOSPC when
 * out is too small.
 */
int aa_nft_run(const char *netns_path, const char *script, char *out, int out_len);

/* Map access by pin path. aa_map_open returns a file descriptor; the others take it. */
int aa_map_open(const char *pin_path);
int aa_map_update(int map_fd, const unsigned char *key, const unsigned char *value);
int aa_map_delete(int map_fd, const unsigned char *key);
int aa_map_lookup(int map_fd, const unsigned char *key, unsigned char *value_out);
int aa_map_lookup_and_delete(int map_fd, const unsigned char *key, unsigned char *value_out);
/* Writes the key after key (the first key when has_key == 0) to next_out; -ENOENT at the end. */
int aa_map_next_key(int map_fd, const unsigned char *key, int has_key, unsigned char *next_out);

/*
 * Runs the sk_lookup program pinned at program_pin_path once with BPF_PROG_TEST_RUN (Linux 5.13
 * or later) on a made-up lookup. The lookup has family AF_INET or AF_INET6 and protocol
 * IPPROTO_TCP or IPPROTO_UDP. remote_ip and local_ip are in network byte order (4 bytes for
 * AF_INET, 16 for AF_INET6), and the ports in host byte order. Writes to result_out (16 bytes, host byte order) the program's verdict as a
 * u32 at offset 0 (1 SK_PASS, 0 SK_DROP) and, as a u64 at offset 8, the cookie of the socket the
 * program assigned with bpf_sk_assign (0 when it assigned none). Returns 0.
 */
int aa_sk_lookup_test_run(const char *program_pin_path, int family, int protocol,
			  const unsigned char *remote_ip, int remote_port,
			  const unsigned char *local_ip, int local_port, unsigned char *result_out);

/*
 * Places a flock(2) lock on the open file fd: exclusive when exclusive != 0, shared otherwise.
 * With nonblocking != 0 it fails at once with -EWOULDBLOCK while another open file description
 * holds a conflicting lock; otherwise it waits. The lock belongs to fd's open file description and
 * is released when the last descriptor of it closes, also when the process dies, whatever PID
 * namespace the holder runs in. Returns 0.
 */
int aa_flock(int fd, int exclusive, int nonblocking);

/* Closes a file descriptor returned by this library. */
int aa_close(int fd);

#endif /* AMBIENT_AGENT_LIBAGENT_H */
