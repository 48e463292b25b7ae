/*
 * A Node-API addon used only by the benchmark: the same map lookup-and-delete that libagent does
 * for Capture.takeOriginalDestination, called through Node-API instead of ffi-rs, to compare the
 * cost of the call path. Built with gcc against Node's own headers (no node-gyp):
 *   gcc -O2 -shared -fPIC -I/usr/include/node -o napi-lookup.node napi-lookup.c
 * lookupAndDelete(mapFd, key, valueOut) returns true on a hit, false on ENOENT, and throws otherwise.
 */
#define NAPI_VERSION 8
#include <errno.h>
#include <linux/bpf.h>
#include <node_api.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static napi_value lookup_and_delete(napi_env env, napi_callback_info info)
{
	size_t argc = 3;
	napi_value argv[3], result;
	int32_t map_fd;
	void *key, *value;
	size_t key_len, value_len;
	union bpf_attr attr;
	long rc;

	if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3 ||
	    napi_get_value_int32(env, argv[0], &map_fd) != napi_ok ||
	    napi_get_buffer_info(env, argv[1], &key, &key_len) != napi_ok ||
	    napi_get_buffer_info(env, argv[2], &value, &value_len) != napi_ok) {
		napi_throw_type_error(env, NULL, "expected (mapFd, key Buffer, value Buffer)");
		return NULL;
	}
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = (__u32)map_fd;
	attr.key = (__u64)(unsigned long)key;
	attr.value = (__u64)(unsigned long)value;
	rc = syscall(__NR_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr, sizeof(attr));
	if (rc != 0 && errno != ENOENT) {
		napi_throw_error(env, NULL, strerror(errno));
		return NULL;
	}
	napi_get_boolean(env, rc == 0, &result);
	return result;
}

static napi_value init(napi_env env, napi_value exports)
{
	napi_value fn;

	napi_create_function(env, "lookupAndDelete", NAPI_AUTO_LENGTH, lookup_and_delete, NULL, &fn);
	napi_set_named_property(env, exports, "lookupAndDelete", fn);
	return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
