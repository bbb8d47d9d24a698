// trim(): glibc's malloc_trim(0), for Node.
//
// glibc gives freed memory back to the system only from the top of its heap. After a burst of
// mail, the buffers of thousands of sessions are freed, but pages of free memory below the
// allocations still alive stay resident: measured after `npm run bench`, 40 MB of Postern's
// 164 MB. malloc_trim(0) hands every whole free page of every arena back (madvise), which nothing
// in Node can ask for. Elsewhere (musl, macOS) there is no such call and the allocators return
// memory themselves: trim() does nothing and returns false.
#include <node_api.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

static napi_value Trim(napi_env env, napi_callback_info info) {
  (void)info;
  int released = 0;
#if defined(__GLIBC__)
  released = malloc_trim(0);
#endif
  napi_value result;
  napi_get_boolean(env, released == 1, &result);
  return result;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "trim", NAPI_AUTO_LENGTH, Trim, NULL, &fn);
  napi_set_named_property(env, exports, "trim", fn);
  return exports;
}
