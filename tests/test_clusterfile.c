/* clusterfile: the cluster file reader (values, defaults, every error with its line), the command lines (exact
 * argv; the ssh form run through a local shell to prove the quoting and the remote start/stop scripts), the state
 * file, detached processes, the HTTP response parser and GET, and the worker probe against a real worker. */
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "cluster/cluster.h"
#include "cluster/clusterfile.h"
#include "core/core.h"

static char g_tmp[256];

static int parse(struct clusterfile *cf, const char *text, char *err)
{
    return clusterfile_parse(cf, text, strlen(text), "/etc/strata/demo.ini", err);
}

/* The text must fail to parse with a message holding every needle (e.g. the line "demo.ini:7:"). */
static void expect_error(const char *text, const char *needle1, const char *needle2, int line)
{
    struct clusterfile cf;
    char err[ST_ERR_LEN] = "";
    int rc = parse(&cf, text, err);
    CHECK_MSG(rc < 0, "line %d: parsed, expected an error with \"%s\"", line, needle1);
    CHECK_MSG(rc >= 0 || strstr(err, needle1), "line %d: \"%s\" not in \"%s\"", line, needle1, err);
    CHECK_MSG(rc >= 0 || !needle2 || strstr(err, needle2), "line %d: \"%s\" not in \"%s\"", line, needle2, err);
    CHECK(cf.nodes == NULL);
    clusterfile_free(&cf);
}
#define EXPECT_ERROR(text, n1, n2) expect_error(text, n1, n2, __LINE__)

static const char *full_file =
    "# a full cluster file\r\n"
    "[cluster]\r\n"
    "name = prod-1\n"
    "model = /srv/models/qwen3   ; the coordinator's copy\n"
    "model_name = \"qwen3 #8bit\"\n"
    "secret_file = secret.txt\n"
    "layers = auto\n"
    "api_host = 0.0.0.0\n"
    "api_port = 9000\n"
    "api_key_file = /etc/strata/api-key\n"
    "parallel = 8\n"
    "ctx = 1024\n"
    "device = cpu\n"
    "send_weights = yes\n"
    "state_dir = /var/lib/strata/prod\n"
    "remote_dir = /var/log/strata\n"
    "strata = /opt/strata/bin/strata\n"
    "log_level = debug\n"
    "start_timeout = 90\n"
    "stop_timeout = 12\n"
    "\n"
    "[node gpu1]\n"
    "address = 10.0.0.11:50051\n"
    "ssh = ops@gpu1.lan\n"
    "model = /data/qwen3\n"
    "device = cuda:1\n"
    "threads = 4\n"
    "max_memory = 20G\n"
    "cache_dir = /data/cache\n"
    "coordinator = yes\n"
    "\n"
    "[node gpu2]\n"
    "host = 10.0.0.12\n"
    "listen = 0.0.0.0:50060\n"
    "ssh = gpu2\n"
    "strata = /usr/bin/strata\n"
    "api_port = 9001\n"
    "coordinator = candidate\n"
    "\n"
    "[node ns]\n"
    "address = [fd00::5]:6000\n"
    "netns = blue\n"
    "max_memory = 512M\n"
    "\n"
    "[node gw]\n"
    "address = 127.0.0.1:7000\n"
    "worker = no\n"
    "coordinator = candidate\n"
    "\n"
    "[node svc]\n"
    "address = 10.0.0.20:50051\n"
    "managed = no   # a systemd worker: never started here, so no ssh/netns/local\n";

static void test_parse_full(void)
{
    struct clusterfile cf;
    char err[ST_ERR_LEN];
    REQUIRE_MSG(parse(&cf, full_file, err) == 0, "%s", err);
    CHECK_STR(cf.name, "prod-1");
    CHECK_STR(cf.dir, "/etc/strata");
    CHECK_STR(cf.model, "/srv/models/qwen3");
    CHECK_STR(cf.model_name, "qwen3 #8bit");
    CHECK_STR(cf.secret_file, "secret.txt");
    CHECK_STR(cf.layers, "");
    CHECK_STR(cf.api_host, "0.0.0.0");
    CHECK_EQ_INT(cf.api_port, 9000);
    CHECK_STR(cf.api_key_file, "/etc/strata/api-key");
    CHECK_EQ_INT(cf.parallel, 8);
    CHECK_EQ_INT(cf.ctx, 1024);
    CHECK(cf.send_weights);
    CHECK_STR(cf.state_dir, "/var/lib/strata/prod");
    CHECK_STR(cf.remote_dir, "/var/log/strata");
    CHECK_STR(cf.strata, "/opt/strata/bin/strata");
    CHECK_STR(cf.log_level, "debug");
    CHECK_EQ_INT(cf.start_timeout_s, 90);
    CHECK_EQ_INT(cf.stop_timeout_s, 12);
    REQUIRE(cf.n_nodes == 5);
    const struct clusterfile_node *a = &cf.nodes[0], *b = &cf.nodes[1], *c = &cf.nodes[2], *g = &cf.nodes[3];
    CHECK(a->managed && g->managed && !cf.nodes[4].managed && cf.nodes[4].worker);
    CHECK_STR(a->name, "gpu1");
    CHECK_STR(a->host, "10.0.0.11");
    CHECK_EQ_INT(a->port, 50051);
    CHECK_STR(a->listen_host, "10.0.0.11");
    CHECK_EQ_INT(a->listen_port, 50051);
    CHECK_EQ_INT(a->launch, CLUSTERFILE_LAUNCH_SSH);
    CHECK_STR(a->target, "ops@gpu1.lan");
    CHECK_STR(a->model, "/data/qwen3");
    CHECK_STR(a->device, "cuda:1");
    CHECK_EQ_INT(a->threads, 4);
    CHECK(a->max_memory_bytes == 20ull << 30);
    CHECK_STR(a->cache_dir, "/data/cache");
    CHECK_EQ_INT(a->coordinator, CLUSTERFILE_COORD_YES);
    CHECK(a->worker);
    CHECK_EQ_INT(a->line, 22);
    CHECK_STR(b->host, "10.0.0.12");
    CHECK_EQ_INT(b->port, CLUSTER_DEFAULT_PORT);
    CHECK_STR(b->listen_host, "0.0.0.0");
    CHECK_EQ_INT(b->listen_port, 50060);
    CHECK_STR(b->strata, "/usr/bin/strata");
    CHECK_EQ_INT(b->api_port, 9001);
    CHECK_EQ_INT(b->coordinator, CLUSTERFILE_COORD_CANDIDATE);
    CHECK_STR(c->host, "fd00::5");
    CHECK_EQ_INT(c->port, 6000);
    CHECK_EQ_INT(c->launch, CLUSTERFILE_LAUNCH_NETNS);
    CHECK_STR(c->target, "blue");
    CHECK(c->max_memory_bytes == 512ull << 20);
    CHECK_EQ_INT(c->coordinator, CLUSTERFILE_COORD_NO);
    CHECK(!g->worker);
    CHECK_EQ_INT(g->launch, CLUSTERFILE_LAUNCH_LOCAL);
    CHECK(clusterfile_coordinator(&cf) == a);
    CHECK(clusterfile_node_find(&cf, "ns") == c);
    CHECK(clusterfile_node_find(&cf, "nope") == NULL);
    CHECK_EQ_INT(clusterfile_n_workers(&cf), 4);
    char host[256], path[2048];
    int port;
    clusterfile_api_address(&cf, b, host, sizeof(host), &port); /* api_host 0.0.0.0: clients use the node's host */
    CHECK_STR(host, "10.0.0.12");
    CHECK_EQ_INT(port, 9001);
    clusterfile_api_address(&cf, a, host, sizeof(host), &port);
    CHECK_EQ_INT(port, 9000);
    /* relative paths: from the file's directory here, as written on ssh nodes */
    CHECK(clusterfile_node_path(&cf, g, cf.secret_file, path, sizeof(path), err) == 0);
    CHECK_STR(path, "/etc/strata/secret.txt");
    CHECK(clusterfile_node_path(&cf, a, cf.secret_file, path, sizeof(path), err) == 0);
    CHECK_STR(path, "secret.txt");
    CHECK(clusterfile_state_dir(&cf, path, sizeof(path), err) == 0);
    CHECK_STR(path, "/var/lib/strata/prod");
    clusterfile_free(&cf);
    clusterfile_free(&cf); /* twice is fine */
}

static void test_defaults(void)
{
    struct clusterfile cf;
    char err[ST_ERR_LEN], dir[2048];
    const char *text = "[node one]\naddress = 127.0.0.1:5000\ncoordinator = yes\nmodel = m\n"
                       "[node two]\naddress = localhost:5001\n";
    REQUIRE_MSG(clusterfile_parse(&cf, text, strlen(text), "my.cluster.ini", err) == 0, "%s", err);
    CHECK_STR(cf.name, "my");
    CHECK_STR(cf.dir, ".");
    CHECK_EQ_INT(cf.api_port, CLUSTER_DEFAULT_API_PORT);
    CHECK_EQ_INT(cf.start_timeout_s, 600);
    CHECK_EQ_INT(cf.stop_timeout_s, 30);
    CHECK_STR(cf.strata, "strata");
    CHECK_EQ_INT(cf.nodes[0].launch, CLUSTERFILE_LAUNCH_LOCAL);
    CHECK_EQ_INT(cf.nodes[1].launch, CLUSTERFILE_LAUNCH_LOCAL);
    CHECK_EQ_INT(cf.nodes[1].coordinator, CLUSTERFILE_COORD_NO);
    CHECK(cf.nodes[1].worker);
    char *old_xdg = getenv("XDG_STATE_HOME") ? st_strdup(getenv("XDG_STATE_HOME")) : NULL;
    char *old_home = getenv("HOME") ? st_strdup(getenv("HOME")) : NULL;
    setenv("XDG_STATE_HOME", "/x/state", 1);
    CHECK(clusterfile_state_dir(&cf, dir, sizeof(dir), err) == 0);
    CHECK_STR(dir, "/x/state/strata/my");
    unsetenv("XDG_STATE_HOME");
    setenv("HOME", "/home/op", 1);
    CHECK(clusterfile_state_dir(&cf, dir, sizeof(dir), err) == 0);
    CHECK_STR(dir, "/home/op/.local/state/strata/my");
    if (old_xdg) setenv("XDG_STATE_HOME", old_xdg, 1);
    if (old_home) setenv("HOME", old_home, 1);
    free(old_xdg);
    free(old_home);
    clusterfile_free(&cf);
    /* a file name that is no usable name needs name = */
    REQUIRE(clusterfile_parse(&cf, text, strlen(text), "/tmp/.hidden", err) < 0);
    CHECK(strstr(err, "set name in [cluster]") != NULL);
}

static void test_errors(void)
{
    const char *ok_nodes = "[node a]\naddress = 127.0.0.1:1\ncoordinator = yes\n";
    char buf[2048];
    EXPECT_ERROR("[cluster]\nmodel = /m\nfoo = 1\n", "demo.ini:3:", "unknown key \"foo\" in [cluster]");
    EXPECT_ERROR("[cluster]\nmodel = /m\n[node a]\naddress = 127.0.0.1:1\ncoordinator = yes\nspeed = 9\n",
                 "demo.ini:6:", "unknown key \"speed\" in [node a]");
    EXPECT_ERROR("[custer]\n", "demo.ini:1:", "unknown section [custer]");
    EXPECT_ERROR("model = /m\n", "demo.ini:1:", "outside a section");
    EXPECT_ERROR("[cluster]\nmodel = /m\nmodel = /n\n", "demo.ini:3:", "set twice in [cluster] (first at line 2)");
    EXPECT_ERROR("[cluster]\n[cluster]\n", "demo.ini:2:", "a second [cluster]");
    EXPECT_ERROR("[cluster]\nmodel=/m\n[node a]\naddress = 127.0.0.1:1\n[node a]\n", "demo.ini:5:",
                 "defined twice (first at line 3)");
    EXPECT_ERROR("[node a b]\n", "demo.ini:1:", "node name \"a b\"");
    EXPECT_ERROR("[node]\n", "demo.ini:1:", "[node NAME]");
    EXPECT_ERROR("[node a]\naddress = 127.0.0.1\n", "demo.ini:2:", "expected HOST:PORT");
    EXPECT_ERROR("[node a]\naddress = 127.0.0.1:70000\n", "demo.ini:2:", "[1, 65535]");
    EXPECT_ERROR("[node a]\naddress = host;rm:1\n", "demo.ini:2:", "not a host name");
    EXPECT_ERROR("[node a]\nworker = maybe\n", "demo.ini:2:", "expected yes or no");
    EXPECT_ERROR("[node a]\nmax_memory = lots\n", "demo.ini:2:", "a size like 512M");
    EXPECT_ERROR("[node a]\nmax_memory = 0\n", "demo.ini:2:", "a size like 512M");
    EXPECT_ERROR("[node a]\nmax_memory = 99999999999T\n", "demo.ini:2:", "a size like 512M");
    EXPECT_ERROR("[node a]\nthreads = -1\n", "demo.ini:2:", "threads");
    EXPECT_ERROR("[node a]\ndevice = tpu\n", "demo.ini:2:", "unknown device \"tpu\"");
    EXPECT_ERROR("[node a]\nssh = -oProxyCommand=evil\n", "demo.ini:2:", "not an ssh target");
    EXPECT_ERROR("[node a]\nssh = a b\n", "demo.ini:2:", "not an ssh target");
    EXPECT_ERROR("[node a]\nnetns = ../x\n", "demo.ini:2:", "is not a name");
    EXPECT_ERROR("[node a]\ncoordinator = maybe\n", "demo.ini:2:", "yes, candidate or no");
    EXPECT_ERROR("[node a]\nlayers = 3\n", "demo.ini:2:", "inclusive range");
    EXPECT_ERROR("[cluster]\nlog_level = loud\n", "demo.ini:2:", "log_level");
    EXPECT_ERROR("[cluster]\nmodel = \"/m\n", "demo.ini:2:", "unterminated");
    EXPECT_ERROR("[cluster]\nmodel = \"/m\" x\n", "demo.ini:2:", "after the closing quote");
    EXPECT_ERROR("[cluster]\nmodel = \"a\\nb\"\n", "demo.ini:2:", "bad escape");
    EXPECT_ERROR("[cluster]\nmodel =\n", "demo.ini:2:", "empty value");
    EXPECT_ERROR("[cluster]\njust words\n", "demo.ini:2:", "key = value");
    EXPECT_ERROR("[cluster]\nModel = x\n", "demo.ini:2:", "bad key");
    EXPECT_ERROR("[cluster\n", "demo.ini:1:", "without ']'");
    EXPECT_ERROR("[cluster] x\n", "demo.ini:1:", "after the section header");
    EXPECT_ERROR("[cluster]\nmodel = a\x01z\n", "demo.ini:2:", "control character");
    EXPECT_ERROR("[cluster]\n", "no [node NAME] sections", NULL);
    EXPECT_ERROR("[node a]\nport = 5\n", "demo.ini:1:", "no address");
    EXPECT_ERROR("[node a]\naddress = 127.0.0.1:1\nhost = x\n", "demo.ini:2:", "either address or host/port");
    EXPECT_ERROR("[cluster]\nmodel=/m\n[node a]\naddress = 10.1.1.1:1\ncoordinator = yes\n", "demo.ini:3:",
                 "say how to start it");
    EXPECT_ERROR("[node a]\naddress = 10.1.1.1:1\nssh = h\nnetns = n\n", "demo.ini:1:", "exclude each other");
    EXPECT_ERROR("[node a]\naddress = 10.1.1.1:1\nlocal = no\n", "demo.ini:3:", "neither ssh nor netns");
    EXPECT_ERROR("[node a]\naddress = 127.0.0.1:1\nworker = no\n", "demo.ini:1:", "does nothing");
    EXPECT_ERROR("[node a]\naddress = 127.0.0.1:1\nworker = no\nmanaged = no\ncoordinator = yes\n", "demo.ini:4:",
                 "managed = no is about its worker");
    EXPECT_ERROR("[cluster]\nmodel=/m\n[node a]\naddress = 10.1.1.1:1\nmanaged = no\ncoordinator = candidate\n",
                 "demo.ini:3:", "say how to start it");
    EXPECT_ERROR("[node a]\naddress = 127.0.0.1:1\n", "no node has coordinator = yes", NULL);
    EXPECT_ERROR("[cluster]\nmodel=/m\n[node a]\naddress = 127.0.0.1:1\ncoordinator = yes\n"
                 "[node b]\naddress = 127.0.0.1:2\ncoordinator = yes\n",
                 "demo.ini:8:", "already node a");
    EXPECT_ERROR("[node a]\naddress = 127.0.0.1:1\ncoordinator = yes\n", "demo.ini:1:", "no model directory");
    EXPECT_ERROR("[cluster]\nmodel=/m\n[node a]\naddress = 127.0.0.1:1\ncoordinator = yes\nworker = no\n",
                 "no node runs a worker", NULL);
    EXPECT_ERROR("[cluster]\nmodel=/m\n[node a]\naddress = 127.0.0.1:1\ncoordinator = yes\n"
                 "[node b]\naddress = 127.0.0.1:1\n",
                 "demo.ini:6:", "same address 127.0.0.1:1");
    EXPECT_ERROR("[cluster]\nmodel=/m\napi_port = 50051\n[node a]\naddress = 127.0.0.1:50051\ncoordinator = yes\n",
                 "demo.ini:4:", "API port 50051 is node a's worker port");
    snprintf(buf, sizeof(buf), "[cluster]\nmodel=/m\nlayers = 0-3,4-7\n%s", ok_nodes);
    EXPECT_ERROR(buf, "demo.ini:3:", "2 ranges for 1 worker");
    snprintf(buf, sizeof(buf), "[cluster]\nmodel=/m\nlayers = 1-7\n%s", ok_nodes);
    EXPECT_ERROR(buf, "demo.ini:3:", "should start at layer 0");
    snprintf(buf, sizeof(buf), "[cluster]\nmodel=/m\nlayers = 0-2,4-7\n%s[node b]\naddress=127.0.0.1:2\n", ok_nodes);
    EXPECT_ERROR(buf, "demo.ini:3:", "range 4-7 should start at layer 3");
    snprintf(buf, sizeof(buf), "[cluster]\nmodel=/m\nlayers = 0-2,x\n%s[node b]\naddress=127.0.0.1:2\n", ok_nodes);
    EXPECT_ERROR(buf, "demo.ini:3:", "inclusive ranges");
    snprintf(buf, sizeof(buf), "[cluster]\nmodel=/m\nlayers = 0-3\n%slayers = 0-3\n", ok_nodes);
    EXPECT_ERROR(buf, "demo.ini:3:", "use one or the other");
    snprintf(buf, sizeof(buf), "[cluster]\nmodel=/m\n%slayers = 0-3\n[node b]\naddress=127.0.0.1:2\n", ok_nodes);
    EXPECT_ERROR(buf, "demo.ini:7:", "node b has no layers");
    snprintf(buf, sizeof(buf), "[cluster]\nmodel=/m\n%slayers = 0-3\n[node b]\naddress=127.0.0.1:2\nlayers = 5-7\n",
             ok_nodes);
    EXPECT_ERROR(buf, "layers of the nodes", "should start at layer 4");
    /* NUL bytes, overlong lines, oversized files */
    struct clusterfile cf;
    char err[ST_ERR_LEN];
    CHECK(clusterfile_parse(&cf, "[cluster]\0x", 11, "f.ini", err) < 0 && strstr(err, "NUL"));
    size_t big = CLUSTERFILE_LINE_MAX + 100;
    char *line = malloc(big + 16);
    REQUIRE(line);
    memcpy(line, "[cluster]\nmodel = ", 18);
    memset(line + 18, 'x', big - 18);
    line[big] = '\n';
    CHECK(clusterfile_parse(&cf, line, big + 1, "f.ini", err) < 0 && strstr(err, "f.ini:2:") && strstr(err, "longer"));
    free(line);
    CHECK(clusterfile_parse(&cf, "", CLUSTERFILE_MAX_BYTES + 1, "f.ini", err) < 0 && strstr(err, "larger than"));
    CHECK(clusterfile_load(&cf, "/nonexistent/x.ini", err) < 0 && strstr(err, "/nonexistent/x.ini"));
}

static void test_layers(void)
{
    struct clusterfile cf;
    char err[ST_ERR_LEN];
    const char *nodes = "[cluster]\nmodel = /m\n[node a]\naddress=127.0.0.1:1\ncoordinator=yes\nlayers = 0 - 2\n"
                        "[node b]\naddress=127.0.0.1:2\nworker = yes\nlayers=3-7\n[node c]\naddress=127.0.0.1:3\n"
                        "worker=no\ncoordinator=candidate\n";
    REQUIRE_MSG(parse(&cf, nodes, err) == 0, "%s", err);
    CHECK_STR(cf.layers, "0-2,3-7");
    clusterfile_free(&cf);
    const char *cl = "[cluster]\nmodel = /m\nlayers = 0-0,1-27\n[node a]\naddress=127.0.0.1:1\ncoordinator=yes\n"
                     "[node b]\naddress=127.0.0.1:2\n";
    REQUIRE_MSG(parse(&cf, cl, err) == 0, "%s", err);
    CHECK_STR(cf.layers, "0-0,1-27");
    clusterfile_free(&cf);
}

static void cmd_expect(const struct cluster_cmd *c, const char *const *want, int line)
{
    int n = 0;
    while (want[n]) n++;
    CHECK_MSG(c->argc == n, "line %d: %d words, expected %d", line, c->argc, n);
    for (int i = 0; i < n && i < c->argc; i++)
        CHECK_MSG(!strcmp(c->argv[i], want[i]), "line %d: word %d is \"%s\", expected \"%s\"", line, i, c->argv[i],
                  want[i]);
    CHECK(c->argv[c->argc] == NULL);
}
#define CMD_EXPECT(c, ...) do { const char *const w_[] = {__VA_ARGS__, NULL}; cmd_expect(c, w_, __LINE__); } while (0)

static void test_commands(void)
{
    struct clusterfile cf;
    char err[ST_ERR_LEN];
    REQUIRE_MSG(parse(&cf, full_file, err) == 0, "%s", err);
    struct cluster_cmd c, l;
    REQUIRE(clusterfile_worker_cmd(&cf, &cf.nodes[0], "/self/strata", &c, err) == 0);
    CMD_EXPECT(&c, "/opt/strata/bin/strata", "worker", "--listen", "10.0.0.11:50051", "--name", "gpu1", "-m",
               "/data/qwen3", "--secret-file", "secret.txt", "--device", "cuda:1", "--threads", "4", "--max-memory",
               "21474836480", "--cache-dir", "/data/cache", "--log-level", "debug");
    cluster_cmd_free(&c);
    REQUIRE(clusterfile_worker_cmd(&cf, &cf.nodes[1], "/self/strata", &c, err) == 0);
    CMD_EXPECT(&c, "/usr/bin/strata", "worker", "--listen", "0.0.0.0:50060", "--name", "gpu2", "--secret-file",
               "secret.txt", "--device", "cpu", "--log-level", "debug");
    cluster_cmd_free(&c);
    REQUIRE(clusterfile_worker_cmd(&cf, &cf.nodes[2], "/self/strata", &c, err) == 0);
    CMD_EXPECT(&c, "/self/strata", "worker", "--listen", "fd00::5:6000", "--name", "ns", "--secret-file",
               "/etc/strata/secret.txt", "--device", "cpu", "--max-memory", "536870912", "--log-level", "debug");
    REQUIRE(clusterfile_launch_cmd(&cf, &cf.nodes[2], &c, "/st/logs/ns.worker.log", &l, err) == 0);
    CHECK_EQ_INT(l.argc, c.argc + 4);
    CHECK_STR(l.argv[0], "ip");
    CHECK_STR(l.argv[1], "netns");
    CHECK_STR(l.argv[2], "exec");
    CHECK_STR(l.argv[3], "blue");
    CHECK_STR(l.argv[4], "/self/strata");
    cluster_cmd_free(&l);
    cluster_cmd_free(&c);
    CHECK(clusterfile_worker_cmd(&cf, &cf.nodes[3], "/self/strata", &c, err) < 0); /* worker = no */
    REQUIRE(clusterfile_coordinator_cmd(&cf, &cf.nodes[1], "/self/strata", &c, err) == 0);
    CMD_EXPECT(&c, "/usr/bin/strata", "serve", "-m", "/srv/models/qwen3", "--host", "0.0.0.0", "--port", "9001",
               "--coordinator-only", "--worker", "10.0.0.11:50051", "--worker", "10.0.0.12:50051", "--worker",
               "fd00::5:6000", "--worker", "10.0.0.20:50051", "--secret-file", "secret.txt", "--api-key-file",
               "/etc/strata/api-key",
               "--send-weights", "--parallel", "8", "--ctx", "1024", "--model-name", "qwen3 #8bit", "--log-level",
               "debug");
    cluster_cmd_free(&c);
    CHECK(clusterfile_coordinator_cmd(&cf, &cf.nodes[2], "/self/strata", &c, err) < 0 && strstr(err, "candidate"));
    /* local: as is */
    REQUIRE(clusterfile_coordinator_cmd(&cf, &cf.nodes[3], "/self/strata", &c, err) == 0);
    CHECK_STR(c.argv[0], "/self/strata");
    CHECK_STR(c.argv[3], "/srv/models/qwen3");
    REQUIRE(clusterfile_launch_cmd(&cf, &cf.nodes[3], &c, "/st/logs/gw.coordinator.log", &l, err) == 0);
    CHECK_EQ_INT(l.argc, c.argc);
    for (int i = 0; i < c.argc; i++) CHECK_STR(l.argv[i], c.argv[i]);
    cluster_cmd_free(&l);
    /* ssh: one remote word for sh -c */
    REQUIRE(clusterfile_launch_cmd(&cf, &cf.nodes[0], &c, "logs dir/gpu1.coordinator.log", &l, err) == 0);
    CMD_EXPECT(&l, "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "--", "ops@gpu1.lan", l.argv[7]);
    CHECK(!strncmp(l.argv[7], "sh -c '", 7));
    CHECK(strstr(l.argv[7], "nohup /self/strata serve") != NULL);
    cluster_cmd_free(&l);
    cluster_cmd_free(&c);
    char logp[1024];
    REQUIRE(clusterfile_log_path(&cf, &cf.nodes[0], "/st", "worker", logp, sizeof(logp), err) == 0);
    CHECK_STR(logp, "/var/log/strata/gpu1.worker.log");
    REQUIRE(clusterfile_log_path(&cf, &cf.nodes[2], "/st", "worker", logp, sizeof(logp), err) == 0);
    CHECK_STR(logp, "/st/logs/ns.worker.log");
    cf.remote_dir[0] = 0;
    REQUIRE(clusterfile_log_path(&cf, &cf.nodes[0], "/st", "worker", logp, sizeof(logp), err) == 0);
    CHECK_STR(logp, ".local/state/strata/prod-1/gpu1.worker.log");
    CHECK(cluster_ssh_cmd("-evil", "true", &c, err) < 0);
    /* formatting for humans */
    char line[256];
    cluster_cmd_init(&c);
    cluster_cmd_add(&c, "a");
    cluster_cmd_add(&c, "b c");
    cluster_cmd_addf(&c, "%d", 7);
    cluster_cmd_format(&c, line, sizeof(line));
    CHECK_STR(line, "a 'b c' 7");
    cluster_cmd_free(&c);
    cluster_cmd_init(&c);
    for (int i = 0; i < CLUSTER_CMD_MAX_ARGS + 3; i++) cluster_cmd_add(&c, "x");
    CHECK(c.failed && c.argc == CLUSTER_CMD_MAX_ARGS);
    cluster_cmd_free(&c);
    clusterfile_free(&cf);
}

static void test_shell_quote(void)
{
    char out[128];
    CHECK(cluster_shell_quote("plain/path-1.2_x:y@z", out, sizeof(out)) == 0);
    CHECK_STR(out, "plain/path-1.2_x:y@z");
    CHECK(cluster_shell_quote("", out, sizeof(out)) == 0);
    CHECK_STR(out, "''");
    CHECK(cluster_shell_quote("a b", out, sizeof(out)) == 0);
    CHECK_STR(out, "'a b'");
    CHECK(cluster_shell_quote("it's", out, sizeof(out)) == 0);
    CHECK_STR(out, "'it'\\''s'");
    CHECK(cluster_shell_quote("$(x)", out, sizeof(out)) == 0);
    CHECK_STR(out, "'$(x)'");
    CHECK(cluster_shell_quote("abcdef", out, 4) == ST_ERANGE);
}

/* The ssh launch, stop and alive scripts, run by a local sh instead of ssh: the quoting survives hostile values
 * (nothing is executed that was not meant to be), the remote pid and start time come back, and stop works. */
static void test_ssh_scripts(void)
{
    struct clusterfile cf;
    char err[ST_ERR_LEN], out[512], eout[512], marker[512], script[1024];
    const char *text = "[cluster]\nmodel = /m\n[node r]\naddress = 10.9.9.9:1\nssh = host\ncoordinator = yes\n";
    REQUIRE_MSG(parse(&cf, text, err) == 0, "%s", err);
    snprintf(marker, sizeof(marker), "%s/pwned", g_tmp);
    char hostile[600];
    snprintf(hostile, sizeof(hostile), "a b'c\"d$(touch %s)`touch %s`;|&<>*?\\", marker, marker);
    struct cluster_cmd inner, l, sh;
    int status;
    /* 1: the words arrive intact (printf writes them to the log) */
    cluster_cmd_init(&inner);
    cluster_cmd_add(&inner, "printf");
    cluster_cmd_add(&inner, "[%s]\\n");
    cluster_cmd_add(&inner, hostile);
    char logp[600];
    snprintf(logp, sizeof(logp), "%s/remote dir/it's.log", g_tmp);
    REQUIRE(clusterfile_launch_cmd(&cf, &cf.nodes[0], &inner, logp, &l, err) == 0);
    cluster_cmd_init(&sh);
    cluster_cmd_add(&sh, "sh");
    cluster_cmd_add(&sh, "-c");
    cluster_cmd_add(&sh, l.argv[7]); /* what the remote login shell gets */
    REQUIRE_MSG(cluster_run_capture(&sh, 10000, out, sizeof(out), eout, sizeof(eout), &status, err) == 0, "%s", err);
    CHECK_MSG(status == 0, "status %d: %s", status, eout);
    int pid = 0;
    unsigned long long st = 0;
    CHECK_MSG(sscanf(out, "%d %llu", &pid, &st) == 2 && pid > 0 && st > 0, "launch printed \"%s\"", out);
    cluster_cmd_free(&sh);
    cluster_cmd_free(&l);
    cluster_cmd_free(&inner);
    for (int i = 0; i < 100 && cluster_proc_alive(pid, 0); i++) usleep(10000);
    char want[700], got[700];
    snprintf(want, sizeof(want), "[%s]", hostile);
    CHECK(cluster_log_last_line(logp, 0, NULL, got, sizeof(got), err) == 0);
    CHECK_STR(got, want);
    struct stat sb;
    CHECK_MSG(stat(marker, &sb) < 0, "the quoting let a command run");
    /* 2: a long-running process: alive, then stopped by the stop script */
    cluster_cmd_init(&inner);
    cluster_cmd_add(&inner, "sleep");
    cluster_cmd_add(&inner, "30");
    REQUIRE(clusterfile_launch_cmd(&cf, &cf.nodes[0], &inner, logp, &l, err) == 0);
    cluster_cmd_init(&sh);
    cluster_cmd_add(&sh, "sh");
    cluster_cmd_add(&sh, "-c");
    cluster_cmd_add(&sh, l.argv[7]);
    REQUIRE(cluster_run_capture(&sh, 10000, out, sizeof(out), eout, sizeof(eout), &status, err) == 0);
    REQUIRE_MSG(sscanf(out, "%d %llu", &pid, &st) == 2 && pid > 0, "launch printed \"%s\"", out);
    cluster_cmd_free(&sh);
    cluster_cmd_free(&l);
    cluster_cmd_free(&inner);
    CHECK(cluster_proc_alive(pid, st));
    const struct { int kind; uint64_t start; const char *want; } steps[] = {
        {0, st, "alive"}, {0, st + 1, "gone"}, {1, st + 1, "gone"}, {1, st, "stopped"}, {0, st, "gone"},
        {1, st, "gone"}};
    for (size_t i = 0; i < ST_ARRAY_LEN(steps); i++) {
        if (steps[i].kind == 0) REQUIRE(cluster_ssh_alive_script(pid, steps[i].start, script, sizeof(script)) == 0);
        else REQUIRE(cluster_ssh_stop_script(pid, steps[i].start, 5, script, sizeof(script)) == 0);
        cluster_cmd_init(&sh);
        cluster_cmd_add(&sh, "sh");
        cluster_cmd_add(&sh, "-c");
        cluster_cmd_add(&sh, script);
        CHECK(cluster_run_capture(&sh, 10000, out, sizeof(out), NULL, 0, &status, err) == 0);
        cluster_cmd_free(&sh);
        CHECK_MSG(!strncmp(out, steps[i].want, strlen(steps[i].want)), "step %zu: \"%s\", expected %s", i, out,
                  steps[i].want);
        if (steps[i].kind == 1 && !strcmp(steps[i].want, "stopped")) {
            /* sh -c's child was reparented; wait until it is gone for good */
            for (int k = 0; k < 200 && cluster_proc_alive(pid, st); k++) usleep(10000);
        }
    }
    CHECK(!cluster_proc_alive(pid, st));
    CHECK(cluster_ssh_alive_script(0, 0, script, sizeof(script)) < 0);
    clusterfile_free(&cf);
}

static void test_state(void)
{
    char path[512], err[ST_ERR_LEN];
    snprintf(path, sizeof(path), "%s/state", g_tmp);
    struct cluster_state *st = calloc(1, sizeof(*st)), *back = calloc(1, sizeof(*back));
    REQUIRE(st && back);
    snprintf(st->cluster, sizeof(st->cluster), "prod");
    struct cluster_proc w = {.role = CLUSTER_ROLE_WORKER, .pid = 1234, .start_time = 987654321,
                             .launch = CLUSTERFILE_LAUNCH_SSH, .started_unix = 1700000000};
    snprintf(w.node, sizeof(w.node), "gpu1");
    snprintf(w.target, sizeof(w.target), "ops@gpu1");
    snprintf(w.address, sizeof(w.address), "10.0.0.1:50051");
    snprintf(w.log, sizeof(w.log), "/var/log/a \"quoted\" #not a comment\\.log");
    struct cluster_proc c = {.role = CLUSTER_ROLE_COORDINATOR, .pid = 77, .launch = CLUSTERFILE_LAUNCH_NETNS};
    snprintf(c.node, sizeof(c.node), "gpu1");
    snprintf(c.target, sizeof(c.target), "blue");
    snprintf(c.address, sizeof(c.address), "10.0.0.1:8100");
    CHECK(cluster_state_put(st, &w) == 0);
    CHECK(cluster_state_put(st, &c) == 0);
    w.pid = 1235;
    CHECK(cluster_state_put(st, &w) == 0); /* replaces */
    CHECK_EQ_INT(st->n_procs, 2);
    REQUIRE_MSG(cluster_state_save(st, path, err) == 0, "%s", err);
    struct stat sb;
    REQUIRE(stat(path, &sb) == 0);
    CHECK_EQ_INT(sb.st_mode & 0777, 0600);
    REQUIRE_MSG(cluster_state_load(back, path, err) == 0, "%s", err);
    CHECK_STR(back->cluster, "prod");
    REQUIRE(back->n_procs == 2);
    struct cluster_proc *bw = cluster_state_find(back, CLUSTER_ROLE_WORKER, "gpu1");
    REQUIRE(bw);
    CHECK_EQ_INT(bw->pid, 1235);
    CHECK(bw->start_time == 987654321);
    CHECK_EQ_INT(bw->launch, CLUSTERFILE_LAUNCH_SSH);
    CHECK_STR(bw->target, "ops@gpu1");
    CHECK_STR(bw->address, "10.0.0.1:50051");
    CHECK_STR(bw->log, w.log);
    CHECK(bw->started_unix == 1700000000);
    struct cluster_proc *bc = cluster_state_find(back, CLUSTER_ROLE_COORDINATOR, NULL);
    REQUIRE(bc);
    CHECK_EQ_INT(bc->pid, 77);
    CHECK_STR(bc->target, "blue");
    CHECK(cluster_state_find(back, CLUSTER_ROLE_WORKER, "other") == NULL);
    cluster_state_remove(back, CLUSTER_ROLE_WORKER, "gpu1");
    CHECK_EQ_INT(back->n_procs, 1);
    CHECK(cluster_state_find(back, CLUSTER_ROLE_COORDINATOR, "gpu1") != NULL);
    /* an empty state removes the file; a missing file is an empty state */
    cluster_state_remove(back, CLUSTER_ROLE_COORDINATOR, "gpu1");
    CHECK(cluster_state_save(back, path, err) == 0);
    CHECK(!file_exists(path));
    CHECK(cluster_state_load(back, path, err) == 0 && back->n_procs == 0);
    /* corrupt files are refused, naming the line */
    const char *bad[] = {
        "[state]\ncluster = x\n[process worker a]\npid = 0\naddress = \"h:1\"\n",
        "[state]\ncluster = x\n[process boss a]\npid = 1\n",
        "[process worker a]\npid = 1\naddress = \"h:1\"\n[process worker a]\n",
        "[process worker a]\npid = 1\nspeed = 3\n",
        "[process worker a]\naddress = \"h:1\"\n",
        "[process worker a]\npid = 12\nlaunch = teleport\n",
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(bad); i++) {
        FILE *f = fopen(path, "w");
        REQUIRE(f);
        fputs(bad[i], f);
        fclose(f);
        CHECK_MSG(cluster_state_load(back, path, err) < 0, "bad state %zu accepted", i);
        CHECK(back->n_procs == 0);
    }
    unlink(path);
    /* a value with a line break cannot be saved */
    snprintf(w.log, sizeof(w.log), "a\nb");
    CHECK(cluster_state_put(st, &w) == 0);
    CHECK(cluster_state_save(st, path, err) < 0);
    CHECK(!file_exists(path));
    free(st);
    free(back);
}

static void test_processes(void)
{
    char err[ST_ERR_LEN], logp[512], line[256];
    snprintf(logp, sizeof(logp), "%s/proc.log", g_tmp);
    struct cluster_cmd c;
    int pid = 0;
    cluster_cmd_init(&c);
    cluster_cmd_add(&c, "sh");
    cluster_cmd_add(&c, "-c");
    cluster_cmd_add(&c, "echo started; echo oops >&2; exec sleep 30");
    REQUIRE_MSG(cluster_proc_spawn(&c, logp, &pid, err) == 0, "%s", err);
    cluster_cmd_free(&c);
    uint64_t st = 0;
    REQUIRE(cluster_proc_start_time(pid, &st, err) == 0);
    CHECK(st > 0);
    CHECK(cluster_proc_alive(pid, st));
    CHECK(!cluster_proc_alive(pid, st + 1)); /* another process with the same pid is not ours */
    CHECK_EQ_INT(getsid(pid), pid);           /* detached: its own session */
    for (int i = 0; i < 200 && cluster_log_last_line(logp, 0, "oops", line, sizeof(line), err) < 0; i++) usleep(10000);
    CHECK(cluster_log_last_line(logp, 0, "started", line, sizeof(line), err) == 0);
    CHECK_STR(line, "started");
    CHECK(cluster_log_last_line(logp, 0, "oops", line, sizeof(line), err) == 0);
    CHECK(cluster_log_last_line(logp, 0, "never", line, sizeof(line), err) == ST_ENOTFOUND);
    CHECK(cluster_log_last_line(logp, 1000, NULL, line, sizeof(line), err) == ST_ENOTFOUND); /* past the end */
    bool killed = true;
    uint64_t t0 = time_ns();
    CHECK(cluster_proc_stop(pid, st, 5000, &killed, err) == 0);
    CHECK(!killed);
    CHECK((time_ns() - t0) / 1000000 < 3000);
    CHECK(!cluster_proc_alive(pid, st));
    CHECK(cluster_proc_stop(pid, st, 100, &killed, err) == 0); /* gone already */
    /* one that ignores SIGTERM is killed after the timeout */
    cluster_cmd_init(&c);
    cluster_cmd_add(&c, "sh");
    cluster_cmd_add(&c, "-c");
    cluster_cmd_add(&c, "trap '' TERM; echo ready; while :; do sleep 1; done");
    REQUIRE(cluster_proc_spawn(&c, logp, &pid, err) == 0);
    cluster_cmd_free(&c);
    for (int i = 0; i < 200 && cluster_log_last_line(logp, 0, "ready", line, sizeof(line), err) < 0; i++) usleep(10000);
    CHECK(cluster_proc_start_time(pid, &st, err) == 0);
    CHECK(cluster_proc_stop(pid, st, 300, &killed, err) == 0);
    CHECK(killed);
    CHECK(!cluster_proc_alive(pid, st));
    /* a binary that does not exist */
    cluster_cmd_init(&c);
    cluster_cmd_add(&c, "/nonexistent/strata");
    CHECK(cluster_proc_spawn(&c, logp, &pid, err) == ST_ENOTFOUND && strstr(err, "/nonexistent/strata"));
    CHECK_EQ_INT(pid, 0);
    char nolog[600];
    snprintf(nolog, sizeof(nolog), "%s/no/such/dir/x.log", g_tmp);
    CHECK(cluster_proc_spawn(&c, nolog, &pid, err) < 0 && strstr(err, "log"));
    cluster_cmd_free(&c);
    CHECK(!cluster_proc_alive(0, 0));
    CHECK(!cluster_proc_alive(-1, 0));
    CHECK(cluster_proc_start_time(1 << 30, &st, err) < 0);
}

static void test_run_capture(void)
{
    char err[ST_ERR_LEN], out[64], eout[64];
    struct cluster_cmd c;
    int status;
    cluster_cmd_init(&c);
    cluster_cmd_add(&c, "sh");
    cluster_cmd_add(&c, "-c");
    cluster_cmd_add(&c, "echo out; echo err >&2; exit 3");
    CHECK(cluster_run_capture(&c, 5000, out, sizeof(out), eout, sizeof(eout), &status, err) == 0);
    CHECK_STR(out, "out\n");
    CHECK_STR(eout, "err\n");
    CHECK_EQ_INT(status, 3);
    cluster_cmd_free(&c);
    /* more output than fits: truncated, still read to the end */
    cluster_cmd_init(&c);
    cluster_cmd_add(&c, "sh");
    cluster_cmd_add(&c, "-c");
    cluster_cmd_add(&c, "i=0; while [ $i -lt 2000 ]; do echo 0123456789; i=$((i+1)); done");
    CHECK(cluster_run_capture(&c, 10000, out, sizeof(out), NULL, 0, &status, err) == 0);
    CHECK_EQ_INT(strlen(out), sizeof(out) - 1);
    CHECK_EQ_INT(status, 0);
    cluster_cmd_free(&c);
    /* a command that hangs is killed at the deadline, with its children (the process group) */
    cluster_cmd_init(&c);
    cluster_cmd_add(&c, "sh");
    cluster_cmd_add(&c, "-c");
    cluster_cmd_add(&c, "sleep 30 & sleep 30");
    uint64_t t0 = time_ns();
    CHECK(cluster_run_capture(&c, 300, out, sizeof(out), NULL, 0, &status, err) == ST_ETIMEDOUT);
    CHECK((time_ns() - t0) / 1000000 < 3000);
    CHECK(status >= 128);
    cluster_cmd_free(&c);
    cluster_cmd_init(&c);
    cluster_cmd_add(&c, "/nonexistent/ssh");
    CHECK(cluster_run_capture(&c, 1000, out, sizeof(out), NULL, 0, &status, err) == ST_ENOTFOUND);
    cluster_cmd_free(&c);
}

static void test_http_parse(void)
{
    char err[ST_ERR_LEN], *body;
    size_t len;
    int status;
#define P(s, max) cluster_http_parse(s, sizeof(s) - 1, max, &status, &body, &len, err)
    REQUIRE(P("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 11\r\n\r\n{\"a\":true}\nEXTRA",
              1024) == 0);
    CHECK_EQ_INT(status, 200);
    CHECK_EQ_INT(len, 11);
    CHECK_STR(body, "{\"a\":true}\n");
    free(body);
    REQUIRE(P("HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
              "5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n", 1024) == 0);
    CHECK_EQ_INT(status, 503);
    CHECK_STR(body, "hello, world");
    CHECK_EQ_INT(len, 12);
    free(body);
    REQUIRE(P("HTTP/1.0 200 OK\nServer: x\n\nuntil close", 1024) == 0); /* bare LF, no length */
    CHECK_STR(body, "until close");
    free(body);
    REQUIRE(P("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 1024) == 0);
    CHECK_EQ_INT(status, 204);
    CHECK_EQ_INT(len, 0);
    free(body);
    CHECK(P("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", 1024) < 0 && strstr(err, "truncated"));
    CHECK(P("HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", 1024) == ST_ERANGE);
    CHECK(P("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 1024) < 0);
    CHECK(P("HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", 1024) < 0);
    CHECK(P("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", 1024) < 0);
    CHECK(P("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", 1024) < 0);
    CHECK(P("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 1024) < 0);
    CHECK(P("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n", 1024) < 0);
    CHECK(P("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n", 1024) == ST_ERANGE);
    CHECK(P("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", 1024) < 0);
    CHECK(P("SMTP ready\r\n\r\n", 1024) < 0);
    CHECK(P("HTTP/1.1 2x0 OK\r\n\r\n", 1024) < 0);
    CHECK(P("HTTP/1.1 200 OK\r\nno end of headers", 1024) < 0);
    CHECK(P("HTTP/1.1 200 OK\r\n\r\n0123456789", 4) == ST_ERANGE);
#undef P
}

/* A one-shot HTTP server on a loopback port: answers one connection with `reply` (or nothing when NULL) after
 * keeping the request it got. */
struct tiny_server {
    int fd, port;
    const char *reply;
    int hold_ms;
    char request[2048];
    pthread_t t;
};

static void *tiny_main(void *arg)
{
    struct tiny_server *s = arg;
    int c = accept(s->fd, NULL, NULL);
    if (c < 0) return NULL;
    size_t n = 0;
    while (n < sizeof(s->request) - 1 && !strstr(s->request, "\r\n\r\n")) {
        ssize_t r = recv(c, s->request + n, sizeof(s->request) - 1 - n, 0);
        if (r <= 0) break;
        n += (size_t)r;
        s->request[n] = 0;
    }
    if (s->reply) {
        size_t len = strlen(s->reply), half = len / 2;
        send(c, s->reply, half, MSG_NOSIGNAL); /* in two pieces */
        usleep(20000);
        send(c, s->reply + half, len - half, MSG_NOSIGNAL);
    }
    if (s->hold_ms) usleep((useconds_t)s->hold_ms * 1000);
    close(c);
    return NULL;
}

static int tiny_start(struct tiny_server *s, const char *reply, int hold_ms)
{
    memset(s, 0, sizeof(*s));
    s->reply = reply;
    s->hold_ms = hold_ms;
    s->fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof(a);
    if (s->fd < 0 || bind(s->fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(s->fd, 4) < 0 ||
        getsockname(s->fd, (struct sockaddr *)&a, &al) < 0)
        return -1;
    s->port = ntohs(a.sin_port);
    return pthread_create(&s->t, NULL, tiny_main, s) == 0 ? 0 : -1;
}

static void tiny_stop(struct tiny_server *s)
{
    pthread_join(s->t, NULL);
    close(s->fd);
}

static void test_http_get(void)
{
    char err[ST_ERR_LEN], *body = NULL;
    size_t len;
    int status;
    struct tiny_server s;
    /* keep-alive server that does not close: the Content-Length ends the answer */
    REQUIRE(tiny_start(&s, "HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}", 2000) == 0);
    uint64_t t0 = time_ns();
    CHECK_MSG(cluster_http_get("127.0.0.1", s.port, "/health", "k3y", 3000, 65536, &status, &body, &len, err) == 0,
              "%s", err);
    CHECK((time_ns() - t0) / 1000000 < 1500);
    CHECK_EQ_INT(status, 200);
    CHECK_STR(body, "{\"status\":\"ok\"}");
    free(body);
    tiny_stop(&s);
    CHECK(strncmp(s.request, "GET /health HTTP/1.1\r\n", 22) == 0);
    CHECK(strstr(s.request, "\r\nAuthorization: Bearer k3y\r\n") != NULL);
    CHECK(strstr(s.request, "\r\nConnection: close\r\n") != NULL);
    /* a server that never answers: the timeout holds */
    REQUIRE(tiny_start(&s, NULL, 1500) == 0);
    t0 = time_ns();
    CHECK(cluster_http_get("127.0.0.1", s.port, "/health", NULL, 300, 65536, &status, &body, &len, err) ==
          ST_ETIMEDOUT);
    CHECK((time_ns() - t0) / 1000000 < 1200);
    CHECK(body == NULL);
    tiny_stop(&s);
    /* garbage */
    REQUIRE(tiny_start(&s, "220 smtp.example ESMTP\r\n\r\n", 0) == 0);
    CHECK(cluster_http_get("127.0.0.1", s.port, "/", NULL, 2000, 65536, &status, &body, &len, err) == ST_EFORMAT);
    tiny_stop(&s);
    /* nothing listening (the port of the closed server) */
    CHECK(cluster_http_get("127.0.0.1", s.port, "/", NULL, 1000, 65536, &status, &body, &len, err) < 0);
    CHECK(cluster_http_get("127.0.0.1", 1, "no-slash", NULL, 1000, 65536, &status, &body, &len, err) == ST_EINVAL);
    CHECK(cluster_http_get("127.0.0.1", 1, "/", "a\r\nX: y", 1000, 65536, &status, &body, &len, err) == ST_EINVAL);
    CHECK(cluster_http_get("no-such-host.invalid", 1, "/", NULL, 1000, 65536, &status, &body, &len, err) < 0);
}

static void test_probe_worker(void)
{
    char err[ST_ERR_LEN];
    const char *secret = "s3cret-for-the-probe";
    struct worker *w = NULL;
    struct worker_opts wo = {.host = "127.0.0.1", .port = 0, .name = "probe-me", .secret = secret,
                             .secret_bytes = strlen(secret), .n_threads = 1, .max_memory_bytes = 300ull << 20};
    REQUIRE_MSG(worker_start(&w, &wo, err) == 0, "%s", err);
    int port = worker_port(w);
    struct node_info ni;
    double rtt = -1;
    CHECK_MSG(cluster_probe_worker("127.0.0.1", port, secret, strlen(secret), 3000, &ni, &rtt, err) == 0, "%s", err);
    CHECK_STR(ni.name, "probe-me");
    CHECK_STR(ni.device, "cpu");
    CHECK(ni.cores >= 1);
    CHECK(ni.mem_total_bytes > 0);
    CHECK(ni.mem_free_bytes > 0 && ni.mem_free_bytes <= 300ull << 20);
    CHECK(!ni.has_model);
    CHECK(rtt >= 0 && rtt < 3000);
    /* the wrong secret, and none, are refused */
    CHECK(cluster_probe_worker("127.0.0.1", port, "wrong", 5, 3000, &ni, NULL, err) < 0);
    CHECK(cluster_probe_worker("127.0.0.1", port, NULL, 0, 3000, &ni, NULL, err) < 0);
    worker_stop(w);
    /* nobody there */
    CHECK(cluster_probe_worker("127.0.0.1", port, secret, strlen(secret), 1000, &ni, NULL, err) < 0);
    /* something that is not a worker: an HTTP server answering garbage */
    struct tiny_server s;
    REQUIRE(tiny_start(&s, "HTTP/1.1 400 Bad Request\r\n\r\n", 0) == 0);
    uint64_t t0 = time_ns();
    CHECK(cluster_probe_worker("127.0.0.1", s.port, NULL, 0, 1000, &ni, NULL, err) < 0);
    CHECK((time_ns() - t0) / 1000000 < 2000);
    tiny_stop(&s);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    log_set_level(LOG_WARN);
    snprintf(g_tmp, sizeof(g_tmp), "%s/strata-test-clusterfile.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(g_tmp)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(test_parse_full);
    RUN(test_defaults);
    RUN(test_errors);
    RUN(test_layers);
    RUN(test_commands);
    RUN(test_shell_quote);
    RUN(test_ssh_scripts);
    RUN(test_state);
    RUN(test_processes);
    RUN(test_run_capture);
    RUN(test_http_parse);
    RUN(test_http_get);
    RUN(test_probe_worker);
    char cmd[400];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_tmp);
    return check_done();
}
