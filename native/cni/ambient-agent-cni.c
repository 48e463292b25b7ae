// ambient-agent-cni: a CNI plugin chained after the node's network plugin. On ADD it sends the
// pod's CNI environment and network configuration to the ambient agent over a unix socket and
// waits until the agent replies that capture is in place, so the pod's containers never start
// uncaptured. When the agent does not reply in time it fails with CNI error 11 ("try again
// later") and the kubelet retries the pod sandbox.
//
// Request (plugin -> agent), one connection per call:
//   CNI_COMMAND=ADD\n ... one KEY=VALUE line per CNI_* variable that is set ...
//   CONFIG_LENGTH=<bytes>\n \n <the network configuration exactly as read from stdin>
// Reply (agent -> plugin), then the agent closes the connection:
//   <exit status in decimal>\n <bytes to print on stdout>
//
// Built as a standalone, statically linked program because it runs on the host, outside any image.

#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

#include "json-scan.h"
#include "socket-io.h"

#define DEFAULT_AGENT_SOCKET "/var/run/ambient-agent/cni.sock"
#define DEFAULT_TIMEOUT_SECONDS 30.0
#define MAX_TIMEOUT_SECONDS 3600.0
/* DEL must not hold up pod removal when the agent is away, so it waits this long at most. */
#define DEL_TIMEOUT_MS 2000
#define MAX_CONFIG_BYTES (1024 * 1024)
#define MAX_REPLY_BYTES (MAX_CONFIG_BYTES + 64 * 1024)
#define MAX_ENV_VALUE_BYTES 16384
#define MAX_EXCLUDED_NAMESPACES 256
#define MAX_NAME_BYTES 254

/* Error codes of the CNI specification 1.0, which reserves the codes below 100. */
#define CNI_ERR_INCOMPATIBLE_VERSION 1
#define CNI_ERR_INVALID_ENV 4
#define CNI_ERR_IO 5
#define CNI_ERR_DECODE 6
#define CNI_ERR_INVALID_CONFIG 7
#define CNI_ERR_TRY_AGAIN_LATER 11

static const char *const SUPPORTED_VERSIONS[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
#define SUPPORTED_VERSION_COUNT (sizeof(SUPPORTED_VERSIONS) / sizeof(SUPPORTED_VERSIONS[0]))

struct config {
	char cni_version[32];
	char agent_socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char excluded[MAX_EXCLUDED_NAMESPACES][MAX_NAME_BYTES];
	size_t excluded_count;
	double timeout_seconds;
	/* The prevResult object as it appears on stdin, or NULL when it is absent or null. */
	const char *prev_result;
	size_t prev_result_len;
};

/* ---- output ---- */

static void print_json_string(const char *text)
{
	putchar('"');
	for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
		if (*c == '"' || *c == '\\')
			printf("\\%c", *c);
		else if (*c == '\n')
			fputs("\\n", stdout);
		else if (*c < 0x20)
			printf("\\u%04x", *c);
		else
			putchar(*c);
	}
	putchar('"');
}

/* Set by DEL, which exits with status 0 whatever fails. */
static int quiet_failures;

/* Prints the CNI error object on stdout and exits with status 1, or exits with 0 when quiet_failures is set. */
static void __attribute__((noreturn, format(printf, 4, 5)))
fail(const char *cni_version, int code, const char *details, const char *format, ...)
{
	char message[1024];
	va_list args;

	if (quiet_failures)
		exit(0);
	va_start(args, format);
	vsnprintf(message, sizeof(message), format, args);
	va_end(args);
	fputs("{\"cniVersion\":", stdout);
	print_json_string(cni_version && *cni_version ? cni_version : "1.0.0");
	printf(",\"code\":%d,\"msg\":", code);
	print_json_string(message);
	fputs(",\"details\":", stdout);
	print_json_string(details ? details : "");
	fputs("}\n", stdout);
	fflush(stdout);
	exit(1);
}

static int write_stdout(const char *data, size_t length)
{
	if (length > 0 && fwrite(data, 1, length, stdout) != length)
		return -1;
	return fflush(stdout);
}

/* ---- the network configuration ---- */

static void read_config_string(struct json_scanner *s, const char *key, char *out, size_t capacity)
{
	int result;

	json_skip_space(s);
	if (s->p >= s->end || *s->p != '"')
		fail(NULL, CNI_ERR_INVALID_CONFIG, NULL, "invalid network configuration: %s must be a string", key);
	result = json_read_string(s, out, capacity);
	if (result == -1)
		fail(NULL, CNI_ERR_DECODE, NULL, "failed to decode the network configuration: invalid string in %s", key);
	if (result == -2)
		fail(NULL, CNI_ERR_INVALID_CONFIG, NULL,
		     "invalid network configuration: %s is longer than %zu bytes or contains a NUL character", key, capacity - 1);
}

static void read_excluded_namespaces(struct json_scanner *s, struct config *config)
{
	json_skip_space(s);
	config->excluded_count = 0;
	if (s->p >= s->end || *s->p != '[')
		fail(NULL, CNI_ERR_INVALID_CONFIG, NULL, "invalid network configuration: exclude_namespaces must be an array of strings");
	s->p++;
	json_skip_space(s);
	if (s->p < s->end && *s->p == ']') {
		s->p++;
		return;
	}
	for (;;) {
		if (config->excluded_count == MAX_EXCLUDED_NAMESPACES)
			fail(NULL, CNI_ERR_INVALID_CONFIG, NULL,
			     "invalid network configuration: exclude_namespaces has more than %d entries", MAX_EXCLUDED_NAMESPACES);
		read_config_string(s, "exclude_namespaces[]", config->excluded[config->excluded_count++], MAX_NAME_BYTES);
		json_skip_space(s);
		if (s->p < s->end && *s->p == ']') {
			s->p++;
			return;
		}
		if (s->p >= s->end || *s->p++ != ',')
			fail(NULL, CNI_ERR_DECODE, NULL, "failed to decode the network configuration: invalid exclude_namespaces array");
		json_skip_space(s);
	}
}

static void read_timeout(struct json_scanner *s, struct config *config)
{
	const char *start;
	char text[64];
	char *end;

	json_skip_space(s);
	start = s->p;
	if (json_skip_number(s) < 0 || (size_t)(s->p - start) >= sizeof(text))
		fail(NULL, CNI_ERR_INVALID_CONFIG, NULL, "invalid network configuration: timeout_seconds must be a number");
	memcpy(text, start, s->p - start);
	text[s->p - start] = '\0';
	config->timeout_seconds = strtod(text, &end);
	if (*end != '\0' || !(config->timeout_seconds > 0) || config->timeout_seconds > MAX_TIMEOUT_SECONDS)
		fail(NULL, CNI_ERR_INVALID_CONFIG, NULL,
		     "invalid network configuration: timeout_seconds is %s, expected a number above 0 and at most %.0f", text,
		     MAX_TIMEOUT_SECONDS);
}

static void read_prev_result(struct json_scanner *s, struct config *config)
{
	const char *start;

	json_skip_space(s);
	start = s->p;
	if (json_skip_value(s, 1) < 0)
		fail(NULL, CNI_ERR_DECODE, NULL, "failed to decode the network configuration: invalid prevResult");
	if (*start == 'n') {
		config->prev_result = NULL;
		return;
	}
	if (*start != '{')
		fail(NULL, CNI_ERR_INVALID_CONFIG, NULL, "invalid network configuration: prevResult must be an object");
	config->prev_result = start;
	config->prev_result_len = (size_t)(s->p - start);
}

static void read_config_member(struct json_scanner *s, struct config *config, const char *key)
{
	if (strcmp(key, "cniVersion") == 0)
		read_config_string(s, key, config->cni_version, sizeof(config->cni_version));
	else if (strcmp(key, "agent_socket") == 0)
		read_config_string(s, key, config->agent_socket, sizeof(config->agent_socket));
	else if (strcmp(key, "exclude_namespaces") == 0)
		read_excluded_namespaces(s, config);
	else if (strcmp(key, "timeout_seconds") == 0)
		read_timeout(s, config);
	else if (strcmp(key, "prevResult") == 0)
		read_prev_result(s, config);
	else if (json_skip_value(s, 1) < 0)
		fail(NULL, CNI_ERR_DECODE, NULL, "failed to decode the network configuration: invalid value of %s", key);
}

/* Reads the members that this plugin uses from the top-level object and checks the rest is valid JSON. */
static void parse_config(const char *text, size_t length, struct config *config)
{
	struct json_scanner s = {text, text + length};
	char key[256];

	memset(config, 0, sizeof(*config));
	strcpy(config->agent_socket, DEFAULT_AGENT_SOCKET);
	config->timeout_seconds = DEFAULT_TIMEOUT_SECONDS;
	json_skip_space(&s);
	if (s.p >= s.end || *s.p++ != '{')
		fail(NULL, CNI_ERR_DECODE, NULL, "failed to decode the network configuration: it is not a JSON object");
	json_skip_space(&s);
	if (s.p < s.end && *s.p == '}') {
		s.p++;
	} else {
		for (;;) {
			int result = json_read_string(&s, key, sizeof(key));
			json_skip_space(&s);
			if (result == -1 || s.p >= s.end || *s.p++ != ':')
				fail(NULL, CNI_ERR_DECODE, NULL, "failed to decode the network configuration: invalid member name");
			/* A longer name matches no member read here, so its value is only checked. */
			read_config_member(&s, config, result == -2 ? "" : key);
			json_skip_space(&s);
			if (s.p < s.end && *s.p == '}') {
				s.p++;
				break;
			}
			if (s.p >= s.end || *s.p++ != ',')
				fail(NULL, CNI_ERR_DECODE, NULL, "failed to decode the network configuration: expected , or } between members");
			json_skip_space(&s);
		}
	}
	json_skip_space(&s);
	if (s.p != s.end)
		fail(NULL, CNI_ERR_DECODE, NULL, "failed to decode the network configuration: text follows the top-level object");
}

static void check_version(const struct config *config)
{
	if (!*config->cni_version)
		fail(NULL, CNI_ERR_INVALID_CONFIG, NULL, "invalid network configuration: cniVersion is missing");
	for (size_t i = 0; i < SUPPORTED_VERSION_COUNT; i++)
		if (strcmp(config->cni_version, SUPPORTED_VERSIONS[i]) == 0)
			return;
	fail(NULL, CNI_ERR_INCOMPATIBLE_VERSION, NULL,
	     "unsupported cniVersion %s: this plugin supports 0.3.0, 0.3.1, 0.4.0, 1.0.0 and 1.1.0", config->cni_version);
}

/* Reads stdin to the end. More than MAX_CONFIG_BYTES is an error. */
static char *read_stdin(size_t *length, const char *cni_version_for_errors)
{
	char *buffer = malloc(MAX_CONFIG_BYTES + 1);
	size_t used = 0;

	if (!buffer)
		fail(cni_version_for_errors, CNI_ERR_IO, NULL, "out of memory reading the network configuration");
	for (;;) {
		ssize_t n = read(STDIN_FILENO, buffer + used, MAX_CONFIG_BYTES + 1 - used);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail(cni_version_for_errors, CNI_ERR_IO, strerror(errno), "failed to read the network configuration from stdin");
		if (n == 0)
			break;
		used += (size_t)n;
		if (used > MAX_CONFIG_BYTES)
			fail(cni_version_for_errors, CNI_ERR_INVALID_CONFIG, NULL,
			     "invalid network configuration: stdin has more than %d bytes", MAX_CONFIG_BYTES);
	}
	buffer[used] = '\0';
	*length = used;
	return buffer;
}

/* ---- the CNI environment ---- */

/* Copies the value of key from CNI_ARGS ("K=V;K=V") into out. Returns 0 when found and -1 when absent or too long. */
static int find_cni_arg(const char *args, const char *key, char *out, size_t capacity)
{
	size_t key_length = strlen(key);

	while (args && *args) {
		const char *end = strchr(args, ';');
		size_t length = end ? (size_t)(end - args) : strlen(args);
		if (length > key_length && memcmp(args, key, key_length) == 0 && args[key_length] == '=') {
			size_t value_length = length - key_length - 1;
			if (value_length >= capacity)
				return -1;
			memcpy(out, args + key_length + 1, value_length);
			out[value_length] = '\0';
			return 0;
		}
		args = end ? end + 1 : NULL;
	}
	return -1;
}

static int is_excluded(const struct config *config)
{
	char namespace[MAX_NAME_BYTES];

	if (find_cni_arg(getenv("CNI_ARGS"), "K8S_POD_NAMESPACE", namespace, sizeof(namespace)) < 0)
		return 0;
	for (size_t i = 0; i < config->excluded_count; i++)
		if (strcmp(namespace, config->excluded[i]) == 0)
			return 1;
	return 0;
}

static const char *const FORWARDED_VARIABLES[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"};
#define FORWARDED_COUNT (sizeof(FORWARDED_VARIABLES) / sizeof(FORWARDED_VARIABLES[0]))

/* Builds the request: the CNI_* lines, CONFIG_LENGTH, a blank line and the configuration. */
static char *build_request(const char *config_text, size_t config_length, size_t *request_length, const char *cni_version)
{
	size_t capacity = config_length + 128;
	char *request, *at;

	for (size_t i = 0; i < FORWARDED_COUNT; i++) {
		const char *value = getenv(FORWARDED_VARIABLES[i]);
		if (!value)
			continue;
		if (strlen(value) > MAX_ENV_VALUE_BYTES || strpbrk(value, "\r\n"))
			fail(cni_version, CNI_ERR_INVALID_ENV, NULL, "invalid %s: longer than %d bytes or contains a line break",
			     FORWARDED_VARIABLES[i], MAX_ENV_VALUE_BYTES);
		capacity += strlen(FORWARDED_VARIABLES[i]) + strlen(value) + 2;
	}
	request = malloc(capacity);
	if (!request)
		fail(cni_version, CNI_ERR_IO, NULL, "out of memory building the request to the ambient agent");
	at = request;
	for (size_t i = 0; i < FORWARDED_COUNT; i++) {
		const char *value = getenv(FORWARDED_VARIABLES[i]);
		if (value)
			at += sprintf(at, "%s=%s\n", FORWARDED_VARIABLES[i], value);
	}
	at += sprintf(at, "CONFIG_LENGTH=%zu\n\n", config_length);
	memcpy(at, config_text, config_length);
	*request_length = (size_t)(at - request) + config_length;
	return request;
}

/* ---- the exchange with the agent ---- */

/*
 * Sends the request and returns the agent's exit status with its stdout bytes in *body. Each of
 * the two phases (connecting, then waiting for the reply) may take up to timeout_ms. Ends the
 * process with CNI error 11 when the agent cannot be reached or does not reply in time.
 */
static int exchange(const struct config *config, const char *request, size_t request_length, int timeout_ms,
		    char **body, size_t *body_length)
{
	int last_error = 0;
	long long deadline = now_ms() + timeout_ms;
	int fd = connect_until(config->agent_socket, deadline, &last_error);
	char *reply;
	ssize_t length;
	int status, result;

	if (fd < 0)
		fail(config->cni_version, CNI_ERR_TRY_AGAIN_LATER, strerror(last_error),
		     "the ambient agent did not accept a connection on %s within %.1f s: check that the agent runs on this node",
		     config->agent_socket, timeout_ms / 1000.0);
	deadline = now_ms() + timeout_ms;
	reply = malloc(MAX_REPLY_BYTES);
	if (!reply)
		fail(config->cni_version, CNI_ERR_IO, NULL, "out of memory reading the ambient agent's reply");
	if (send_all(fd, request, request_length, deadline) < 0)
		fail(config->cni_version, CNI_ERR_TRY_AGAIN_LATER, strerror(errno), "failed to send the request to the ambient agent on %s",
		     config->agent_socket);
	length = receive_all(fd, reply, MAX_REPLY_BYTES, deadline);
	if (length < 0 && errno == EMSGSIZE)
		fail(config->cni_version, CNI_ERR_IO, NULL, "invalid reply from the ambient agent: longer than %d bytes", MAX_REPLY_BYTES);
	if (length < 0)
		fail(config->cni_version, CNI_ERR_TRY_AGAIN_LATER, strerror(errno),
		     "the ambient agent on %s did not reply within %.1f s: check the agent's log", config->agent_socket, timeout_ms / 1000.0);
	close(fd);

	if (length == 0)
		fail(config->cni_version, CNI_ERR_TRY_AGAIN_LATER, NULL,
		     "the ambient agent on %s closed the connection without a reply: check the agent's log", config->agent_socket);
	result = parse_reply(reply, (size_t)length, &status, body, body_length);
	if (result == -1)
		fail(config->cni_version, CNI_ERR_IO, NULL, "invalid reply from the ambient agent: no status line");
	if (result < 0)
		fail(config->cni_version, CNI_ERR_IO, NULL,
		     "invalid reply from the ambient agent: bad status line (expected 0 to 255): check that the plugin binary matches the agent's version");
	return status;
}
/* ---- commands ---- */

static void print_versions(void)
{
	fputs("{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[", stdout);
	for (size_t i = 0; i < SUPPORTED_VERSION_COUNT; i++)
		printf("%s\"%s\"", i ? "," : "", SUPPORTED_VERSIONS[i]);
	fputs("]}\n", stdout);
	fflush(stdout);
}

static void require_env(const char *cni_version, const char *name)
{
	const char *value = getenv(name);
	if (!value || !*value)
		fail(cni_version, CNI_ERR_INVALID_ENV, NULL, "%s is not set: the container runtime must set it for ADD", name);
}

/* Prints the prevResult unchanged, or {"cniVersion":...} when the configuration has none. */
static int print_prev_result(const struct config *config)
{
	if (config->prev_result)
		return write_stdout(config->prev_result, config->prev_result_len) < 0 || write_stdout("\n", 1) < 0 ? 1 : 0;
	fputs("{\"cniVersion\":", stdout);
	print_json_string(config->cni_version);
	fputs("}\n", stdout);
	return fflush(stdout) == 0 ? 0 : 1;
}

static int run_add(void)
{
	struct config config;
	size_t config_length, request_length, body_length;
	char *config_text = read_stdin(&config_length, NULL);
	char *request, *body;
	int status;

	parse_config(config_text, config_length, &config);
	check_version(&config);
	if (config.agent_socket[0] != '/')
		fail(config.cni_version, CNI_ERR_INVALID_CONFIG, NULL,
		     "invalid network configuration: agent_socket %s is not an absolute path", config.agent_socket);
	require_env(config.cni_version, "CNI_CONTAINERID");
	require_env(config.cni_version, "CNI_NETNS");
	require_env(config.cni_version, "CNI_IFNAME");
	if (is_excluded(&config))
		return print_prev_result(&config);

	request = build_request(config_text, config_length, &request_length, config.cni_version);
	status = exchange(&config, request, request_length, (int)(config.timeout_seconds * 1000), &body, &body_length);
	if (write_stdout(body, body_length) < 0)
		return 1;
	return status;
}

/* Tells the agent about a removed pod, best effort: DEL must succeed even when the agent is away. */
static int run_del(void)
{
	struct config config;
	size_t config_length, request_length;
	char *config_text, *request;
	char reply[4096];
	long long deadline;
	int fd, last_error;

	/* From here on, fail() exits with status 0 and prints nothing. */
	quiet_failures = 1;
	config_text = read_stdin(&config_length, NULL);
	parse_config(config_text, config_length, &config);
	request = build_request(config_text, config_length, &request_length, config.cni_version);
	deadline = now_ms() + DEL_TIMEOUT_MS;
	fd = connect_until(config.agent_socket, deadline, &last_error);
	if (fd < 0)
		return 0;
	if (send_all(fd, request, request_length, deadline) == 0)
		receive_all(fd, reply, sizeof(reply), deadline);
	close(fd);
	return 0;
}

int main(void)
{
	const char *command = getenv("CNI_COMMAND");

	signal(SIGPIPE, SIG_IGN);
	if (!command || !*command)
		fail(NULL, CNI_ERR_INVALID_ENV, NULL, "CNI_COMMAND is not set: run this plugin from a container runtime");
	if (strcmp(command, "VERSION") == 0) {
		print_versions();
		return 0;
	}
	if (strcmp(command, "ADD") == 0)
		return run_add();
	if (strcmp(command, "DEL") == 0)
		return run_del();
	/* CHECK, GC and STATUS have nothing to verify here: the agent keeps capture in place itself. */
	if (strcmp(command, "CHECK") == 0 || strcmp(command, "GC") == 0 || strcmp(command, "STATUS") == 0)
		return 0;
	fail(NULL, CNI_ERR_INVALID_ENV, NULL, "unknown CNI_COMMAND %s: expected ADD, DEL, CHECK, VERSION, GC or STATUS", command);
}
