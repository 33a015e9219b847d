/* The UDP fast path of the forwarder (optional; see proxy/accel.py).
 *
 * A Relay reads client queries from the UDP listeners and upstream replies
 * from its own connected upstream sockets, in batches (recvmmsg/sendmmsg),
 * and relays the common case without building Python objects for it: a
 * well-formed query (the same checks as wire.question_end) from an address
 * Python's ACL already let through, that no live rule may select, to the
 * first upstream of the next order.  Everything else goes back to Python as
 * (data, addr) and through Forwarder.handle, unchanged.
 *
 * Replies are accepted exactly as UpstreamSocket.datagram_received accepts
 * them: the ID pending on that socket, QR set, one question, the same
 * question (bytes, else ignoring ASCII case in the name).  Counters are kept
 * here and handed to Python by flush(); timeouts and ICMP errors hand the
 * pending entries to Python, which retries them through its own path.
 *
 * Everything runs with the GIL held, from the event loop's reader callbacks.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 32          /* datagrams per recvmmsg */
#define ROUNDS 4          /* recvmmsg calls per pump at most: the loop stays fair */
#define BUFSZ 65536       /* a UDP datagram's largest size */
#define MAXQ 512          /* queries kept for a retry; longer ones go to Python */
#define NBUCKETS 14
#define HINFO 13

static const double BUCKETS[NBUCKETS - 1] = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0};

typedef struct {
    uint64_t counts[NBUCKETS];
    double total;
} Hist;

static void
observe(Hist *h, double seconds)
{
    int i = 0;
    while (i < NBUCKETS - 1 && BUCKETS[i] < seconds)  /* bisect_left */
        i++;
    h->counts[i]++;
    h->total += seconds;
}

typedef struct Pend {
    struct Pend *prev, *next;  /* the socket's list, in order of sending */
    int sock;
    uint16_t txid;
    int listener;
    struct sockaddr_storage client;
    socklen_t clen;
    PyObject *ip;      /* the client's address as text (the ACL's key) */
    PyObject *order;   /* the tuple of upstreams the query walks */
    double sent, start;
    uint16_t qlen, qend;
    unsigned char query[MAXQ];  /* as the client sent it (its ID) */
} Pend;

typedef struct {
    int fd;
    int upstream;
    Pend **by_id;  /* 65536 slots */
    Pend *head, *tail;
    Py_ssize_t count;
    int nq;        /* datagrams queued for this round's sendmmsg */
    struct mmsghdr q[BATCH];
    struct iovec qiov[BATCH];
    int refused;   /* an ICMP error seen: Python is told after the round */
} USock;

typedef struct {
    uint64_t sent, replies;
    Hist latency;
    int answered;
    int nsocks;
    int *socks;
} Ups;

typedef struct {
    PyObject_HEAD
    int nlisteners;
    int lfd[64];
    PyObject *lreply[64], *lname[64];  /* each listener's reply_to and text, for handle() */
    int nsocks;
    USock *socks;
    int nups;
    Ups *ups;
    Py_ssize_t cap;
    PyObject *allowed;    /* dict: raw address bytes -> (address text, an upstream's?) */
    int norders;
    int *ofirst;
    PyObject **oorder;
    uint64_t turn;
    PyObject *engine, *gate, *deps_answer, *on_refused, *handle;
    uint64_t queries_udp, fast, from_upstreams, answers, unmatched, mismatched, send_dropped;
    uint64_t rcodes[16];
    Hist latency;
    uint32_t *qtypes;
    uint16_t *touched;
    int ntouched;
    Pend *free;
    Py_ssize_t pending;
    int closed;
    unsigned char rnd[3 * 4096];
    int rpos;
    unsigned char *bufs;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_storage addrs[BATCH];
    struct mmsghdr out[BATCH];
    struct iovec outiov[BATCH];
    struct sockaddr_storage outaddr[BATCH];
    int outl[BATCH];
} Relay;

/* --- parsing ------------------------------------------------------------ */

/* wire.question_end: the offset past the question, or -1 (drop), -2
 * (FORMERR), -3 (NOTIMP) for what Python answers as malformed. */
static long
question_end(const unsigned char *d, size_t n)
{
    if (n < 12)
        return -1;
    if (d[2] & 0x80)
        return -1;
    if (d[2] & 0x78)
        return -3;
    if (d[4] != 0 || d[5] != 1)
        return -2;
    size_t pos = 12;
    if (pos >= n)
        return -2;
    unsigned len = d[pos];
    while (len) {
        if (len > 63)
            return -2;
        pos += len + 1;
        if (pos >= n)
            return -2;
        len = d[pos];
    }
    if (pos - 12 >= 255)
        return -2;
    pos += 5;
    if (pos > n)
        return -2;
    return (long)pos;
}

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static const unsigned char *
randoms(Relay *r, int count)
{
    if (r->rpos + count > (int)sizeof(r->rnd)) {
        size_t got = 0;
        while (got < sizeof(r->rnd)) {
            ssize_t k = getrandom(r->rnd + got, sizeof(r->rnd) - got, 0);
            if (k > 0)
                got += (size_t)k;
        }
        r->rpos = 0;
    }
    const unsigned char *p = r->rnd + r->rpos;
    r->rpos += count;
    return p;
}

static PyObject *
raw_address(const struct sockaddr_storage *sa)
{
    if (sa->ss_family == AF_INET)
        return PyBytes_FromStringAndSize(
            (const char *)&((const struct sockaddr_in *)sa)->sin_addr, 4);
    if (sa->ss_family == AF_INET6)
        return PyBytes_FromStringAndSize(
            (const char *)&((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
    return NULL;
}

/* The address as the event loop gives it: (host, port) or (host, port, flowinfo, scope). */
static PyObject *
address_tuple(const struct sockaddr_storage *sa, PyObject *ip)
{
    char text[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        if (ip == NULL) {
            inet_ntop(AF_INET, &a->sin_addr, text, sizeof(text));
            return Py_BuildValue("(si)", text, ntohs(a->sin_port));
        }
        return Py_BuildValue("(Oi)", ip, ntohs(a->sin_port));
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
        if (ip == NULL) {
            inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof(text));
            return Py_BuildValue("(siII)", text, ntohs(a->sin6_port),
                                 (unsigned)ntohl(a->sin6_flowinfo), (unsigned)a->sin6_scope_id);
        }
        return Py_BuildValue("(OiII)", ip, ntohs(a->sin6_port),
                             (unsigned)ntohl(a->sin6_flowinfo), (unsigned)a->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

/* --- pending entries ------------------------------------------------------ */

static void
unlink_pend(Relay *r, Pend *p)
{
    USock *s = &r->socks[p->sock];
    if (p->prev) p->prev->next = p->next; else s->head = p->next;
    if (p->next) p->next->prev = p->prev; else s->tail = p->prev;
    s->by_id[p->txid] = NULL;
    s->count--;
    r->pending--;
}

static void
free_pend(Relay *r, Pend *p)
{
    Py_CLEAR(p->ip);
    Py_CLEAR(p->order);
    p->next = r->free;
    r->free = p;
}

/* (sock, query, qend, addr, listener, order, sent, start) for Python's retry. */
static PyObject *
pend_tuple(Pend *p)
{
    PyObject *addr = address_tuple(&p->client, p->ip);
    if (addr == NULL)
        return NULL;
    PyObject *t = Py_BuildValue("(iy#iNiOdd)", p->sock, (const char *)p->query,
                                (Py_ssize_t)p->qlen, (int)p->qend, addr, p->listener,
                                p->order, p->sent, p->start);
    return t;
}

/* --- the object ------------------------------------------------------------ */

static void
Relay_clear_pending(Relay *r)
{
    for (int i = 0; i < r->nsocks; i++) {
        USock *s = &r->socks[i];
        while (s->head) {
            Pend *p = s->head;
            unlink_pend(r, p);
            free_pend(r, p);
        }
    }
}

static void
clear_orders(Relay *r)
{
    for (int i = 0; i < r->norders; i++)
        Py_CLEAR(r->oorder[i]);
    PyMem_Free(r->oorder);
    PyMem_Free(r->ofirst);
    r->oorder = NULL;
    r->ofirst = NULL;
    r->norders = 0;
}

static void
clear_listeners(Relay *r)
{
    for (int i = 0; i < r->nlisteners; i++) {
        Py_CLEAR(r->lreply[i]);
        Py_CLEAR(r->lname[i]);
    }
    r->nlisteners = 0;
}

static void
Relay_dealloc(Relay *r)
{
    clear_listeners(r);
    if (r->socks) {
        Relay_clear_pending(r);
        for (int i = 0; i < r->nsocks; i++)
            PyMem_Free(r->socks[i].by_id);
        PyMem_Free(r->socks);
    }
    while (r->free) {
        Pend *p = r->free;
        r->free = p->next;
        PyMem_Free(p);
    }
    if (r->ups) {
        for (int i = 0; i < r->nups; i++)
            PyMem_Free(r->ups[i].socks);
        PyMem_Free(r->ups);
    }
    clear_orders(r);
    Py_CLEAR(r->allowed);
    Py_CLEAR(r->engine);
    Py_CLEAR(r->gate);
    Py_CLEAR(r->deps_answer);
    Py_CLEAR(r->on_refused);
    Py_CLEAR(r->handle);
    PyMem_Free(r->qtypes);
    PyMem_Free(r->touched);
    PyMem_Free(r->bufs);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* Relay(sockets, upstreams, cap, engine, gate, deps_answer, on_refused, handle):
 * sockets: [(fd, upstream index)] of connected upstream sockets; gate() is
 * asked once per batch while engine.active; handle(data, addr, reply_to,
 * False, listener) takes the queries the fast path does not. */
static int
Relay_init(Relay *r, PyObject *args, PyObject *kwds)
{
    PyObject *sockets, *engine, *gate, *deps_answer, *on_refused, *handle;
    int nups;
    Py_ssize_t cap;
    if (!PyArg_ParseTuple(args, "O!inOOOOO", &PyList_Type, &sockets, &nups, &cap, &engine,
                          &gate, &deps_answer, &on_refused, &handle))
        return -1;
    if (r->socks) {
        PyErr_SetString(PyExc_RuntimeError, "Relay already initialised");
        return -1;
    }
    int n = (int)PyList_GET_SIZE(sockets);
    if (nups < 1 || n < nups) {
        PyErr_SetString(PyExc_ValueError, "every upstream needs a socket");
        return -1;
    }
    r->socks = PyMem_Calloc((size_t)n, sizeof(USock));
    r->ups = PyMem_Calloc((size_t)nups, sizeof(Ups));
    r->qtypes = PyMem_Calloc(65536, sizeof(uint32_t));
    r->touched = PyMem_Calloc(65536, sizeof(uint16_t));
    r->bufs = PyMem_Malloc((size_t)BATCH * BUFSZ);
    r->allowed = PyDict_New();
    if (!r->socks || !r->ups || !r->qtypes || !r->touched || !r->bufs || !r->allowed) {
        PyErr_NoMemory();
        return -1;
    }
    r->nups = nups;
    for (int i = 0; i < nups; i++) {
        r->ups[i].socks = PyMem_Calloc((size_t)n, sizeof(int));
        if (!r->ups[i].socks) {
            PyErr_NoMemory();
            return -1;
        }
    }
    for (int i = 0; i < n; i++) {
        int fd, up;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(sockets, i), "ii", &fd, &up))
            return -1;
        if (up < 0 || up >= nups) {
            PyErr_SetString(PyExc_ValueError, "upstream index out of range");
            return -1;
        }
        USock *s = &r->socks[i];
        s->fd = fd;
        s->upstream = up;
        s->by_id = PyMem_Calloc(65536, sizeof(Pend *));
        if (!s->by_id) {
            PyErr_NoMemory();
            return -1;
        }
        r->nsocks = i + 1;
        Ups *u = &r->ups[up];
        u->socks[u->nsocks++] = i;
    }
    for (int i = 0; i < nups; i++)
        if (r->ups[i].nsocks == 0) {
            PyErr_SetString(PyExc_ValueError, "every upstream needs a socket");
            return -1;
        }
    r->cap = cap < 1 ? 1 : cap;
    r->rpos = sizeof(r->rnd);
    Py_INCREF(engine);
    r->engine = engine;
    Py_INCREF(handle);
    r->handle = handle;
    Py_INCREF(gate);
    r->gate = gate;
    Py_INCREF(deps_answer);
    r->deps_answer = deps_answer;
    Py_INCREF(on_refused);
    r->on_refused = on_refused;
    return 0;
}

/* add_listener(fd, reply_to, listener) -> index: a bound, non-blocking UDP socket. */
static PyObject *
Relay_add_listener(Relay *r, PyObject *args)
{
    int fd;
    PyObject *reply_to, *name;
    if (!PyArg_ParseTuple(args, "iOU", &fd, &reply_to, &name))
        return NULL;
    if (r->nlisteners >= 64) {
        PyErr_SetString(PyExc_ValueError, "too many listeners");
        return NULL;
    }
    int i = r->nlisteners;
    r->lfd[i] = fd;
    Py_INCREF(reply_to);
    r->lreply[i] = reply_to;
    Py_INCREF(name);
    r->lname[i] = name;
    return PyLong_FromLong(r->nlisteners++);
}

/* allow(raw address bytes, address text, upstream): the ACL let this client
 * through; `upstream`: it is an upstream's address (counted, for loop suspicion). */
static PyObject *
Relay_allow(Relay *r, PyObject *args)
{
    PyObject *raw, *text;
    int upstream;
    if (!PyArg_ParseTuple(args, "SUp", &raw, &text, &upstream))
        return NULL;
    if (PyDict_GET_SIZE(r->allowed) >= 65536)
        PyDict_Clear(r->allowed);
    PyObject *value = Py_BuildValue("(OO)", text, upstream ? Py_True : Py_False);
    if (!value)
        return NULL;
    int res = PyDict_SetItem(r->allowed, raw, value);
    Py_DECREF(value);
    if (res < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Relay_clear_allowed(Relay *r, PyObject *unused)
{
    PyDict_Clear(r->allowed);
    Py_RETURN_NONE;
}

/* set_orders([(first upstream index, order tuple)]): empty sends everything to Python. */
static PyObject *
Relay_set_orders(Relay *r, PyObject *arg)
{
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg);
    int *first = PyMem_Calloc((size_t)(n ? n : 1), sizeof(int));
    PyObject **order = PyMem_Calloc((size_t)(n ? n : 1), sizeof(PyObject *));
    if (!first || !order) {
        PyMem_Free(first);
        PyMem_Free(order);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o;
        int up;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(arg, i), "iO", &up, &o) || up < 0
                || up >= r->nups) {
            for (Py_ssize_t j = 0; j < i; j++)
                Py_DECREF(order[j]);
            PyMem_Free(first);
            PyMem_Free(order);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "upstream index out of range");
            return NULL;
        }
        first[i] = up;
        Py_INCREF(o);
        order[i] = o;
    }
    clear_orders(r);
    r->ofirst = first;
    r->oorder = order;
    r->norders = (int)n;
    Py_RETURN_NONE;
}

/* --- the engine's screen ------------------------------------------------------ */

/* Whether a live rule may select this name (Screen.may_select): 1 yes, 0 no, -1 error. */
static int
may_select(PyObject *names, PyObject *zones, const unsigned char *d, long qend)
{
    unsigned char low[256];
    long n = qend - 4 - 12;
    if (n <= 0 || n > 256)
        return 1;
    for (long i = 0; i < n; i++) {
        unsigned char c = d[12 + i];
        low[i] = (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
    }
    PyObject *name = PyBytes_FromStringAndSize((const char *)low, n);
    if (!name)
        return -1;
    int hit = PySet_Contains(names, name);
    Py_DECREF(name);
    if (hit != 0)
        return hit;
    if (PySet_GET_SIZE(zones) == 0)
        return 0;
    long pos = 0;
    while (pos < n && low[pos]) {  /* wire.under_zones: every suffix but the root */
        PyObject *tail = PyBytes_FromStringAndSize((const char *)low + pos, n - pos);
        if (!tail)
            return -1;
        hit = PySet_Contains(zones, tail);
        Py_DECREF(tail);
        if (hit != 0)
            return hit;
        pos += low[pos] + 1;
    }
    return 0;
}

/* --- sending ------------------------------------------------------------------ */

static void
tell_refused(Relay *r)
{
    for (int i = 0; i < r->nsocks; i++) {
        if (!r->socks[i].refused)
            continue;
        int err = r->socks[i].refused;
        r->socks[i].refused = 0;
        PyObject *res = PyObject_CallFunction(r->on_refused, "ii", i, err);
        if (res == NULL)
            PyErr_WriteUnraisable(r->on_refused);
        Py_XDECREF(res);
    }
}

static void
send_upstream(Relay *r, USock *s)
{
    int done = 0;
    while (done < s->nq) {
        int k = sendmmsg(s->fd, s->q + done, (unsigned)(s->nq - done), 0);
        if (k > 0) {
            done += k;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH) {
            s->refused = errno;  /* its pending entries go to Python's next attempt */
            break;
        }
        done++;  /* EAGAIN or worse: lost, like a lost datagram; the timeout retries it */
    }
    s->nq = 0;
}

static void
send_clients(Relay *r, int count)
{
    /* One sendmmsg per listener, in the order the answers came. */
    struct mmsghdr batch[BATCH];
    for (int l = 0; l < r->nlisteners; l++) {
        int m = 0;
        for (int i = 0; i < count; i++)
            if (r->outl[i] == l)
                batch[m++] = r->out[i];
        if (r->lfd[l] < 0) {  /* closed: its clients' answers have nowhere to go */
            r->send_dropped += (uint64_t)m;
            continue;
        }
        int done = 0;
        while (done < m) {
            int k = sendmmsg(r->lfd[l], batch + done, (unsigned)(m - done), 0);
            if (k > 0) {
                done += k;
                continue;
            }
            if (errno == EINTR)
                continue;
            r->send_dropped++;  /* best effort, as a datagram transport's error_received */
            done++;
        }
    }
}

static void
setup_recv(Relay *r)
{
    for (int i = 0; i < BATCH; i++) {
        r->iov[i].iov_base = r->bufs + (size_t)i * BUFSZ;
        r->iov[i].iov_len = BUFSZ;
        memset(&r->msgs[i].msg_hdr, 0, sizeof(struct msghdr));
        r->msgs[i].msg_hdr.msg_iov = &r->iov[i];
        r->msgs[i].msg_hdr.msg_iovlen = 1;
        r->msgs[i].msg_hdr.msg_name = &r->addrs[i];
        r->msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
    }
}

/* --- client queries ------------------------------------------------------------ */

/* Hand the queries the fast path did not take to Python's handle(); the
 * first error is raised once the others are handled (the loop logs it). */
static int
hand_over(Relay *r, PyObject *slow, int l)
{
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(slow) && !r->closed; i++) {
        PyObject *item = PyList_GET_ITEM(slow, i);
        PyObject *argv[5] = {PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1),
                             r->lreply[l], Py_False, r->lname[l]};
        PyObject *res = PyObject_Vectorcall(r->handle, argv, 5, NULL);
        if (res == NULL) {
            if (type == NULL)
                PyErr_Fetch(&type, &value, &tb);
            else
                PyErr_Clear();
        }
        Py_XDECREF(res);
    }
    if (type != NULL) {
        PyErr_Restore(type, value, tb);
        return -1;
    }
    return 0;
}

/* `arg` as an index below `count`, or -1 with a Python error set. */
static int
index_arg(PyObject *arg, int count, const char *what)
{
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred())
        return -1;
    if (i < 0 || i >= count) {
        PyErr_Format(PyExc_ValueError, "no such %s", what);
        return -1;
    }
    return (int)i;
}

/* pump_queries(listener): the listener's reader. */
static PyObject *
Relay_pump_queries(Relay *r, PyObject *arg)
{
    if (r->closed)
        Py_RETURN_NONE;
    int l = index_arg(arg, r->nlisteners, "listener");
    if (l < 0)
        return NULL;
    int fd = r->lfd[l];
    if (fd < 0)
        Py_RETURN_NONE;
    PyObject *slow = NULL;
    for (int round = 0; round < ROUNDS; round++) {
        setup_recv(r);
        int got = recvmmsg(fd, r->msgs, BATCH, MSG_DONTWAIT, NULL);
        if (got <= 0)
            break;
        r->queries_udp += (uint64_t)got;
        PyObject *gate = NULL;  /* the engine's answer, asked once per batch */
        PyObject *names = NULL, *zones = NULL;
        int gate_all = -1;      /* 1: every query may go fast, 0: none, -1: ask the screen */
        double now = 0.0;
        int queued = 0;
        for (int i = 0; i < got; i++) {
            unsigned char *d = r->iov[i].iov_base;
            size_t n = r->msgs[i].msg_len;
            struct sockaddr_storage *sa = &r->addrs[i];
            int fast = 0;
            long qend = -1;
            PyObject *ip = NULL;  /* owned */
            if ((r->msgs[i].msg_hdr.msg_flags & MSG_TRUNC) == 0 && n <= MAXQ
                    && r->norders > 0)
                qend = question_end(d, n);
            if (qend > 0 && (d[qend - 4] << 8 | d[qend - 3]) != HINFO) {
                PyObject *raw = raw_address(sa);
                if (raw) {
                    PyObject *known = PyDict_GetItemWithError(r->allowed, raw);
                    if (known) {
                        ip = PyTuple_GET_ITEM(known, 0);
                        Py_INCREF(ip);  /* the gate's Python code runs before it is used */
                        if (PyTuple_GET_ITEM(known, 1) == Py_True)
                            r->from_upstreams++;
                    }
                    Py_DECREF(raw);
                }
                if (PyErr_Occurred())
                    PyErr_Clear();
            }
            if (ip != NULL) {
                if (gate_all == -1 && gate == NULL) {
                    /* No live run: no need to call the gate at all. */
                    PyObject *act = PyObject_GetAttrString(r->engine, "active");
                    int active = act ? PyObject_IsTrue(act) : -1;
                    Py_XDECREF(act);
                    if (active < 0) {
                        PyErr_Clear();
                        active = 1;
                    }
                    gate = active ? PyObject_CallNoArgs(r->gate) : Py_NewRef(Py_None);
                    if (gate == NULL) {
                        PyErr_Clear();  /* Python's path meets the same error and counts it */
                        gate_all = 0;
                    } else if (gate == Py_None) {
                        gate_all = 1;
                    } else if (gate == Py_False) {
                        gate_all = 0;
                    } else {
                        names = PyObject_GetAttrString(gate, "names");
                        zones = PyObject_GetAttrString(gate, "zones");
                        if (!names || !zones || !PyFrozenSet_Check(names)
                                || !PyFrozenSet_Check(zones)) {
                            PyErr_Clear();
                            gate_all = 0;
                        }
                    }
                    now = monotonic();
                }
                if (gate_all == 1)
                    fast = 1;
                else if (gate_all == -1) {
                    int hit = may_select(names, zones, d, qend);
                    if (hit < 0)
                        PyErr_Clear();
                    fast = hit == 0;
                }
            }
            USock *s = NULL;
            if (fast) {
                uint64_t turn = ++r->turn;
                int o = (int)(turn % (uint64_t)r->norders);
                Ups *u = &r->ups[r->ofirst[o]];
                const unsigned char *rb = randoms(r, 3);
                s = &r->socks[u->socks[rb[2] % u->nsocks]];
                if (s->count >= r->cap || s->nq >= BATCH) {
                    fast = 0;  /* Python decides: another socket, or SERVFAIL (overload) */
                } else {
                    Pend *p = r->free;
                    if (p)
                        r->free = p->next;
                    else if (!(p = PyMem_Malloc(sizeof(Pend))))
                        fast = 0;
                    if (fast) {
                        uint16_t txid = (uint16_t)(rb[0] << 8 | rb[1]);
                        while (s->by_id[txid]) {
                            const unsigned char *x = randoms(r, 2);
                            txid = (uint16_t)(x[0] << 8 | x[1]);
                        }
                        memset(p, 0, offsetof(Pend, query));
                        p->sock = (int)(s - r->socks);
                        p->txid = txid;
                        p->listener = l;
                        memcpy(&p->client, sa, r->msgs[i].msg_hdr.msg_namelen);
                        p->clen = r->msgs[i].msg_hdr.msg_namelen;
                        Py_INCREF(ip);
                        p->ip = ip;
                        Py_INCREF(r->oorder[o]);
                        p->order = r->oorder[o];
                        p->sent = p->start = now;
                        p->qlen = (uint16_t)n;
                        p->qend = (uint16_t)qend;
                        memcpy(p->query, d, n);
                        p->prev = s->tail;
                        if (s->tail) s->tail->next = p; else s->head = p;
                        s->tail = p;
                        s->by_id[txid] = p;
                        s->count++;
                        r->pending++;
                        uint16_t qtype = (uint16_t)(d[qend - 4] << 8 | d[qend - 3]);
                        if (r->qtypes[qtype]++ == 0)
                            r->touched[r->ntouched++] = qtype;
                        d[0] = (unsigned char)(txid >> 8);
                        d[1] = (unsigned char)txid;
                        struct mmsghdr *m = &s->q[s->nq];
                        memset(m, 0, sizeof(*m));
                        s->qiov[s->nq].iov_base = d;
                        s->qiov[s->nq].iov_len = n;
                        m->msg_hdr.msg_iov = &s->qiov[s->nq];
                        m->msg_hdr.msg_iovlen = 1;
                        s->nq++;
                        r->ups[s->upstream].sent++;
                        r->fast++;
                        queued++;
                    }
                }
            }
            Py_XDECREF(ip);
            if (!fast) {
                if (slow == NULL && !(slow = PyList_New(0)))
                    goto error;
                PyObject *addr = address_tuple(sa, NULL);
                PyObject *item = addr ? Py_BuildValue("(y#N)", (const char *)d,
                                                      (Py_ssize_t)n, addr) : NULL;
                if (!item || PyList_Append(slow, item) < 0) {
                    Py_XDECREF(item);
                    goto error;
                }
                Py_DECREF(item);
            }
        }
        Py_XDECREF(gate);
        Py_XDECREF(names);
        Py_XDECREF(zones);
        if (queued)
            for (int k = 0; k < r->nsocks; k++)
                if (r->socks[k].nq)
                    send_upstream(r, &r->socks[k]);
        tell_refused(r);
        if (slow != NULL) {
            int failed = hand_over(r, slow, l);
            Py_CLEAR(slow);
            if (failed || r->closed)
                return failed ? NULL : Py_NewRef(Py_None);
        }
        if (got < BATCH)
            break;
    }
    Py_RETURN_NONE;
error:
    Py_XDECREF(slow);
    return NULL;
}

/* --- upstream replies ------------------------------------------------------------ */

static int
same_question(const unsigned char *d, size_t n, const Pend *p)
{
    size_t qlen = (size_t)p->qend - 12;
    const unsigned char *q = p->query + 12;
    if (n < 12 + qlen)
        return 0;
    if (memcmp(d + 12, q, qlen) == 0)
        return 1;
    if (memcmp(d + 12 + qlen - 4, q + qlen - 4, 4) != 0)
        return 0;
    for (size_t i = 0; i < qlen - 4; i++) {
        unsigned char a = d[12 + i], b = q[i];
        if (a >= 'A' && a <= 'Z') a += 32;
        if (b >= 'A' && b <= 'Z') b += 32;
        if (a != b)
            return 0;
    }
    return 1;
}

/* pump_replies(sock): read that upstream socket's replies and answer the clients. */
static PyObject *
Relay_pump_replies(Relay *r, PyObject *arg)
{
    int si = index_arg(arg, r->nsocks, "socket");
    if (si < 0)
        return NULL;
    USock *s = &r->socks[si];
    Ups *u = &r->ups[s->upstream];
    if (r->closed)
        Py_RETURN_NONE;
    for (int round = 0; round < ROUNDS; round++) {
        setup_recv(r);
        int got = recvmmsg(s->fd, r->msgs, BATCH, MSG_DONTWAIT, NULL);
        if (got < 0) {
            if (errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH)
                s->refused = errno;
            break;
        }
        if (got == 0)
            break;
        double now = monotonic();
        int nout = 0;
        for (int i = 0; i < got; i++) {
            unsigned char *d = r->iov[i].iov_base;
            size_t n = r->msgs[i].msg_len;
            if (n < 2 || (r->msgs[i].msg_hdr.msg_flags & MSG_TRUNC)) {
                if (n < 2)
                    r->unmatched++;
                continue;
            }
            Pend *p = s->by_id[(uint16_t)(d[0] << 8 | d[1])];
            if (p == NULL) {
                r->unmatched++;  /* loop probes go out on Python's sockets, never these */
                continue;
            }
            if (!(n >= 12 && (d[2] & 0x80) && d[4] == 0 && d[5] == 1 && same_question(d, n, p))) {
                r->mismatched++;
                continue;
            }
            unlink_pend(r, p);
            u->replies++;
            u->answered = 1;
            observe(&u->latency, now - p->sent);
            if (r->deps_answer != Py_None) {
                d[0] = p->query[0];
                d[1] = p->query[1];
                PyObject *question = PyBytes_FromStringAndSize((const char *)p->query + 12,
                                                               p->qend - 12);
                PyObject *reply = PyBytes_FromStringAndSize((const char *)d, (Py_ssize_t)n);
                if (question && reply) {
                    PyObject *argv[3] = {p->ip, question, reply};
                    PyObject *res = PyObject_Vectorcall(r->deps_answer, argv, 3, NULL);
                    if (res == NULL)
                        PyErr_WriteUnraisable(r->deps_answer);
                    Py_XDECREF(res);
                } else {
                    PyErr_Clear();
                }
                Py_XDECREF(question);
                Py_XDECREF(reply);
            }
            r->answers++;
            r->rcodes[d[3] & 15]++;
            observe(&r->latency, now - p->start);
            d[0] = p->query[0];
            d[1] = p->query[1];
            memcpy(&r->outaddr[nout], &p->client, p->clen);
            struct mmsghdr *m = &r->out[nout];
            memset(m, 0, sizeof(*m));
            r->outiov[nout].iov_base = d;
            r->outiov[nout].iov_len = n;
            m->msg_hdr.msg_iov = &r->outiov[nout];
            m->msg_hdr.msg_iovlen = 1;
            m->msg_hdr.msg_name = &r->outaddr[nout];
            m->msg_hdr.msg_namelen = p->clen;
            r->outl[nout] = p->listener;
            nout++;
            free_pend(r, p);
        }
        if (nout)
            send_clients(r, nout);
        if (got < BATCH)
            break;
    }
    tell_refused(r);
    Py_RETURN_NONE;
}

/* --- Python's side: timeouts, errors, counters ------------------------------------ */

/* Append to `out` the entry tuples of the attempts on `s` sent at or before
 * `cutoff` (oldest first), removing them; -1 on a Python error. */
static int
take_sent_before(Relay *r, USock *s, double cutoff, PyObject *out)
{
    while (s->head && s->head->sent <= cutoff) {
        Pend *p = s->head;
        PyObject *t = pend_tuple(p);
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            return -1;
        }
        Py_DECREF(t);
        unlink_pend(r, p);
        free_pend(r, p);
    }
    return 0;
}

/* expired(cutoff) -> [entry tuple] of the attempts sent at or before `cutoff`, removed. */
static PyObject *
Relay_expired(Relay *r, PyObject *arg)
{
    double cutoff = PyFloat_AsDouble(arg);
    if (cutoff == -1.0 && PyErr_Occurred())
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (int i = 0; i < r->nsocks; i++) {
        if (take_sent_before(r, &r->socks[i], cutoff, out) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* take_pending(sock) -> [entry tuple] of everything waiting on that socket, removed. */
static PyObject *
Relay_take_pending(Relay *r, PyObject *arg)
{
    int si = index_arg(arg, r->nsocks, "socket");
    if (si < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    if (take_sent_before(r, &r->socks[si], HUGE_VAL, out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *
hist_tuple(Hist *h)
{
    PyObject *counts = PyList_New(NBUCKETS);
    if (!counts)
        return NULL;
    for (int i = 0; i < NBUCKETS; i++)
        PyList_SET_ITEM(counts, i, PyLong_FromUnsignedLongLong(h->counts[i]));
    PyObject *t = Py_BuildValue("(Nd)", counts, h->total);
    memset(h, 0, sizeof(*h));
    return t;
}

/* flush() -> the counters since the last flush, zeroed here:
 * (queries_udp, fast, from_upstreams, answers, unmatched, mismatched, send_dropped, rcodes, latency,
 *  qtypes {type: count}, [(sent, replies, latency, answered)] per upstream). */
static PyObject *
Relay_flush(Relay *r, PyObject *unused)
{
    PyObject *rcodes = PyList_New(16);
    PyObject *qtypes = PyDict_New();
    PyObject *ups = PyList_New(r->nups);
    if (!rcodes || !qtypes || !ups)
        goto error;
    for (int i = 0; i < 16; i++) {
        PyList_SET_ITEM(rcodes, i, PyLong_FromUnsignedLongLong(r->rcodes[i]));
        r->rcodes[i] = 0;
    }
    for (int i = 0; i < r->ntouched; i++) {
        uint16_t t = r->touched[i];
        PyObject *k = PyLong_FromLong(t), *v = PyLong_FromUnsignedLong(r->qtypes[t]);
        if (!k || !v || PyDict_SetItem(qtypes, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            goto error;
        }
        Py_DECREF(k);
        Py_DECREF(v);
        r->qtypes[t] = 0;
    }
    r->ntouched = 0;
    for (int i = 0; i < r->nups; i++) {
        Ups *u = &r->ups[i];
        PyObject *t = Py_BuildValue("(KKNO)", (unsigned long long)u->sent,
                                    (unsigned long long)u->replies, hist_tuple(&u->latency),
                                    u->answered ? Py_True : Py_False);
        if (!t)
            goto error;
        PyList_SET_ITEM(ups, i, t);
        u->sent = u->replies = 0;
        u->answered = 0;
    }
    PyObject *out = Py_BuildValue("(KKKKKKKNNNN)", (unsigned long long)r->queries_udp,
                                  (unsigned long long)r->fast,
                                  (unsigned long long)r->from_upstreams,
                                  (unsigned long long)r->answers,
                                  (unsigned long long)r->unmatched,
                                  (unsigned long long)r->mismatched,
                                  (unsigned long long)r->send_dropped, rcodes,
                                  hist_tuple(&r->latency), qtypes, ups);
    r->queries_udp = r->fast = r->from_upstreams = r->answers = r->unmatched = r->mismatched = r->send_dropped = 0;
    return out;
error:
    Py_XDECREF(rcodes);
    Py_XDECREF(qtypes);
    Py_XDECREF(ups);
    return NULL;
}

/* next_turn(): the turn counter the orders rotate on, shared with Python's path. */
static PyObject *
Relay_next_turn(Relay *r, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(++r->turn);
}

static PyObject *
Relay_pending(Relay *r, PyObject *unused)
{
    return PyLong_FromSsize_t(r->pending);
}

/* forget_listeners(): their sockets are closed; the fd numbers may be reused. */
static PyObject *
Relay_forget_listeners(Relay *r, PyObject *unused)
{
    for (int i = 0; i < r->nlisteners; i++)
        r->lfd[i] = -1;
    Py_RETURN_NONE;
}

static PyObject *
Relay_close(Relay *r, PyObject *unused)
{
    Relay_clear_pending(r);
    clear_orders(r);
    clear_listeners(r);
    r->closed = 1;
    /* The callables refer back to the forwarder: let the cycle go. */
    Py_CLEAR(r->engine);
    Py_CLEAR(r->gate);
    Py_CLEAR(r->deps_answer);
    Py_CLEAR(r->on_refused);
    Py_CLEAR(r->handle);
    Py_RETURN_NONE;
}

static PyMethodDef Relay_methods[] = {
    {"add_listener", (PyCFunction)Relay_add_listener, METH_VARARGS,
     "add_listener(fd, reply_to, listener) -> index: a bound, non-blocking UDP socket."},
    {"allow", (PyCFunction)Relay_allow, METH_VARARGS,
     "allow(raw, text): the ACL let this client address through."},
    {"clear_allowed", (PyCFunction)Relay_clear_allowed, METH_NOARGS, "Forget allowed addresses."},
    {"set_orders", (PyCFunction)Relay_set_orders, METH_O,
     "set_orders([(first upstream index, order)])."},
    {"pump_queries", (PyCFunction)Relay_pump_queries, METH_O,
     "pump_queries(listener): relay its queries; the rest go to handle()."},
    {"pump_replies", (PyCFunction)Relay_pump_replies, METH_O, "pump_replies(sock)."},
    {"expired", (PyCFunction)Relay_expired, METH_O,
     "expired(cutoff) -> [(sock, query, qend, addr, listener, order, sent, start)]."},
    {"take_pending", (PyCFunction)Relay_take_pending, METH_O,
     "take_pending(sock) -> the entries waiting on that socket."},
    {"flush", (PyCFunction)Relay_flush, METH_NOARGS, "The counters since the last flush."},
    {"next_turn", (PyCFunction)Relay_next_turn, METH_NOARGS,
     "The next turn of the orders' rotation (shared with the fast path)."},
    {"pending", (PyCFunction)Relay_pending, METH_NOARGS, "Queries waiting for an upstream."},
    {"forget_listeners", (PyCFunction)Relay_forget_listeners, METH_NOARGS,
     "The listeners' sockets are closed: send nothing more on them."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS, "Forget everything pending."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The UDP fast path of one forwarder.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
};

static PyObject *
mod_question_end(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    long end = question_end(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromLong(end);
}

static PyMethodDef module_methods[] = {
    {"question_end", mod_question_end, METH_O,
     "question_end(data) -> offset past the question; -1 drop, -2 FORMERR, -3 NOTIMP."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef relaymodule = {
    PyModuleDef_HEAD_INIT, "proxy._relay", "The UDP fast path (see proxy/accel.py).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__relay(void)
{
    if (PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&relaymodule);
    if (!m)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
