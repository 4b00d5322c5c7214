package redistest

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// ClusterOptions tune StartCluster; zero values take the defaults.
type ClusterOptions struct {
	Masters           int           // default 3
	ReplicasPerMaster int           // default 0
	NodeTimeout       time.Duration // cluster-node-timeout; default 2s
}

// Cluster is a Redis Cluster of real redis-server processes on free ports
// in temporary folders, stopped when the test ends. It is built with
// cluster commands over go-redis, not redis-cli, so it needs nothing but
// redis-server (CI machines may lack redis-cli).
//
// Masters and Replicas are the roles the nodes were given at the start; a
// failover does not update them. MasterFor asks the cluster who serves a
// key now.
type Cluster struct {
	// Masters serve the slots in order: Masters[i] the i-th even share.
	Masters []*Server
	// Replicas[i] replicate Masters[i].
	Replicas [][]*Server
	// Addrs are every node's host:port, masters first.
	Addrs []string
	// URL is the cluster's seed URL for redis.mode cluster, every node a
	// seed so that a killed master leaves the others:
	// redis://m1?addr=m2&addr=m3… (redis.ParseClusterURL; no db number).
	URL string

	nodes []*Server // Masters, then the Replicas in order
}

// pollEvery is how often the cluster's waits ask again: the cluster
// converges by gossip (every 100 ms) and by its own timers, which tell no
// one when they are done.
const pollEvery = 50 * time.Millisecond

// StartCluster starts the nodes, assigns the slots, joins them and
// returns once every node reports cluster_state:ok and every replica is in
// sync with its master. Replicas may always take over
// (cluster-replica-validity-factor 0), so killing a master with Kill
// promotes its replica after NodeTimeout; every node keeps its
// nodes.conf and AOF in its folder, so Revive brings a killed master back
// as a replica of the node that took over.
func StartCluster(tb testing.TB, o ClusterOptions) *Cluster {
	tb.Helper()
	if o.Masters <= 0 {
		o.Masters = 3
	}
	if o.ReplicasPerMaster < 0 {
		o.ReplicasPerMaster = 0
	}
	if o.NodeTimeout <= 0 {
		o.NodeTimeout = 2 * time.Second
	}
	args := []string{"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
		"--cluster-node-timeout", fmt.Sprint(o.NodeTimeout.Milliseconds()),
		"--cluster-replica-validity-factor", "0",
		"--appendonly", "yes",
		// A replica's first sync waits 5 s by default for more replicas
		// to share one diskless transfer; each master here has its own.
		"--repl-diskless-sync-delay", "0"}
	// The cluster bus defaults to the port + 10000, past 65535 for many
	// of the ports the kernel hands out: each node gets a free one, kept
	// in its arguments so that Revive reuses it.
	bus := map[*Server]int{}
	start := func() *Server {
		b, err := freePort()
		if err != nil {
			tb.Fatalf("redistest: %v", err)
		}
		s := StartArgs(tb, append(args, "--cluster-port", fmt.Sprint(b))...)
		bus[s] = b
		return s
	}
	c := &Cluster{}
	for i := 0; i < o.Masters; i++ {
		c.Masters = append(c.Masters, start())
	}
	for i := 0; i < o.Masters; i++ {
		var rs []*Server
		for j := 0; j < o.ReplicasPerMaster; j++ {
			rs = append(rs, start())
		}
		c.Replicas = append(c.Replicas, rs)
	}
	c.nodes = append(c.nodes, c.Masters...)
	for _, rs := range c.Replicas {
		c.nodes = append(c.nodes, rs...)
	}
	for _, n := range c.nodes {
		c.Addrs = append(c.Addrs, n.Addr)
	}
	c.URL = "redis://" + c.Addrs[0]
	for i, a := range c.Addrs[1:] {
		sep := "&"
		if i == 0 {
			sep = "?"
		}
		c.URL += sep + "addr=" + a
	}

	ctx := context.Background()
	clients := make([]*redis.Client, len(c.nodes))
	ids := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		clients[i] = n.Client(tb)
		// Distinct epochs up front, as redis-cli does, so no two masters
		// claim their slots with the same epoch (a collision the cluster
		// would only settle slowly).
		if err := clients[i].Do(ctx, "cluster", "set-config-epoch", i+1).Err(); err != nil {
			tb.Fatalf("redistest: cluster set-config-epoch on %s: %v", n.Addr, err)
		}
		id, err := clients[i].Do(ctx, "cluster", "myid").Text()
		if err != nil {
			tb.Fatalf("redistest: cluster myid on %s: %v", n.Addr, err)
		}
		ids[i] = id
	}
	per := 16384 / o.Masters
	for i := range c.Masters {
		lo, hi := i*per, (i+1)*per-1
		if i == o.Masters-1 {
			hi = 16383
		}
		if err := clients[i].Do(ctx, "cluster", "addslotsrange", lo, hi).Err(); err != nil {
			tb.Fatalf("redistest: cluster addslotsrange %d %d on %s (needs Redis 7): %v", lo, hi, c.nodes[i].Addr, err)
		}
	}
	for _, n := range c.nodes[1:] {
		host, port := splitAddr(n.Addr)
		if err := clients[0].Do(ctx, "cluster", "meet", host, port, bus[n]).Err(); err != nil {
			tb.Fatalf("redistest: cluster meet %s: %v", n.Addr, err)
		}
	}
	// A node still in handshake is listed under a made-up id: wait for
	// the real ids, or CLUSTER REPLICATE would not find its master.
	c.poll(tb, "every node to know every other (CLUSTER MEET)", func() (bool, string) {
		for i, cl := range clients {
			out, err := cl.ClusterNodes(ctx).Result()
			if err != nil {
				return false, c.nodes[i].Addr + ": " + err.Error()
			}
			for _, id := range ids {
				if !strings.Contains(out, id) || strings.Contains(out, "handshake") {
					return false, fmt.Sprintf("%s does not know all %d nodes yet; its CLUSTER NODES:\n%s", c.nodes[i].Addr, len(ids), out)
				}
			}
		}
		return true, ""
	})
	for i := range c.Masters {
		for j, r := range c.Replicas[i] {
			cl := clients[o.Masters+i*o.ReplicasPerMaster+j]
			if err := cl.Do(ctx, "cluster", "replicate", ids[i]).Err(); err != nil {
				tb.Fatalf("redistest: cluster replicate %s on %s: %v", ids[i], r.Addr, err)
			}
		}
	}
	c.WaitStateOK(tb)
	c.poll(tb, "every replica to be in sync (master_link_status:up)", func() (bool, string) {
		for i, n := range c.nodes[o.Masters:] {
			info, err := clients[o.Masters+i].Info(ctx, "replication").Result()
			if err != nil {
				return false, n.Addr + ": " + err.Error()
			}
			if !strings.Contains(info, "master_link_status:up") {
				return false, n.Addr + " INFO replication:\n" + info
			}
		}
		return true, ""
	})
	return c
}

// poll calls check until it reports done, failing the test with what it
// waited for and check's last detail after 30 s.
func (c *Cluster) poll(tb testing.TB, what string, check func() (bool, string)) {
	tb.Helper()
	const within = 30 * time.Second
	deadline := time.Now().Add(within)
	for {
		ok, detail := check()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("redistest: waited %s for %s; last:\n%s", within, what, detail)
		}
		time.Sleep(pollEvery)
	}
}

// live are the nodes whose process runs.
func (c *Cluster) live() []*Server {
	var out []*Server
	for _, n := range c.nodes {
		if n.cmd != nil {
			out = append(out, n)
		}
	}
	return out
}

// Client returns a cluster client on the cluster, closed when the test
// ends. It reads the slot map again once it is a second old, as sluice's
// clients do (go-redis's default, a minute, would keep it calling a killed
// master that long: a dead node sends no MOVED to learn from).
func (c *Cluster) Client(tb testing.TB) *redis.ClusterClient {
	tb.Helper()
	cl := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs, ClusterStateReloadInterval: time.Second})
	tb.Cleanup(func() { _ = cl.Close() })
	return cl
}

// WaitStateOK waits up to 30 s until every live node reports
// cluster_state:ok and names a live master for every slot: after a
// master's Kill, until its replica took over; after its Revive, until it
// learnt it is a replica now.
func (c *Cluster) WaitStateOK(tb testing.TB) {
	tb.Helper()
	ctx := context.Background()
	c.poll(tb, "cluster_state:ok on every live node with every slot on a live master", func() (bool, string) {
		live := map[string]bool{}
		for _, n := range c.live() {
			live[n.Addr] = true
		}
		var first, firstAddr string
		for _, n := range c.live() {
			cl := redis.NewClient(&redis.Options{Addr: n.Addr, MaxRetries: -1})
			info, err := cl.ClusterInfo(ctx).Result()
			var slots []slotOwner
			if err == nil {
				slots, err = owners(ctx, cl)
			}
			nodes := ""
			if err == nil && !strings.Contains(info, "cluster_state:ok") {
				nodes, _ = cl.ClusterNodes(ctx).Result()
			}
			_ = cl.Close()
			if err != nil {
				return false, n.Addr + ": " + err.Error()
			}
			if !strings.Contains(info, "cluster_state:ok") {
				return false, n.Addr + " CLUSTER INFO:\n" + info + "\nCLUSTER NODES:\n" + nodes
			}
			covered := int64(0)
			for _, s := range slots {
				if !live[s.master] || s.health != "online" {
					return false, fmt.Sprintf("%s puts slots %d-%d on %q (%s), not a live master", n.Addr, s.lo, s.hi, s.master, s.health)
				}
				covered += s.hi - s.lo + 1
			}
			if covered != 16384 {
				return false, fmt.Sprintf("%s serves %d of 16384 slots", n.Addr, covered)
			}
			// A revived master believes in its old slots until gossip
			// tells it otherwise: all live nodes must agree.
			view := fmt.Sprint(slots)
			if first == "" {
				first, firstAddr = view, n.Addr
			} else if view != first {
				return false, fmt.Sprintf("%s and %s disagree on the slots' masters:\n%s\n%s", firstAddr, n.Addr, first, view)
			}
		}
		return true, ""
	})
}

// MasterFor is the master that serves key's slot now, as the first live
// node that answers CLUSTER SHARDS says: right after a failover too, once
// WaitStateOK returned.
func (c *Cluster) MasterFor(tb testing.TB, key string) *Server {
	tb.Helper()
	ctx := context.Background()
	var why []string
	for _, n := range c.live() {
		cl := redis.NewClient(&redis.Options{Addr: n.Addr, MaxRetries: -1})
		slot, err := cl.ClusterKeySlot(ctx, key).Result()
		var slots []slotOwner
		if err == nil {
			slots, err = owners(ctx, cl)
		}
		_ = cl.Close()
		if err != nil {
			why = append(why, n.Addr+": "+err.Error())
			continue
		}
		for _, s := range slots {
			if s.lo <= slot && slot <= s.hi && s.master != "" {
				for _, m := range c.nodes {
					if m.Addr == s.master {
						return m
					}
				}
				tb.Fatalf("redistest: %s names %s, not a node of this cluster, as the master of %q", n.Addr, s.master, key)
			}
		}
		why = append(why, fmt.Sprintf("%s: no master for slot %d (call WaitStateOK after a failover)", n.Addr, slot))
	}
	tb.Fatalf("redistest: no live node names the master of %q: %s", key, strings.Join(why, "; "))
	return nil
}

// slotOwner is a range of slots and the master that serves it, as one
// node sees them.
type slotOwner struct {
	lo, hi int64
	master string // host:port; "" when the shard has no master
	health string // the master's: online, failed or loading
}

// owners asks cl for CLUSTER SHARDS (Redis 7) and returns each slot range
// with its shard's master.
func owners(ctx context.Context, cl *redis.Client) ([]slotOwner, error) {
	shards, err := cl.ClusterShards(ctx).Result()
	if err != nil {
		return nil, err
	}
	var out []slotOwner
	for _, sh := range shards {
		var master, health string
		for _, n := range sh.Nodes {
			if n.Role == "master" {
				master, health = fmt.Sprintf("%s:%d", n.IP, n.Port), n.Health
			}
		}
		for _, r := range sh.Slots {
			out = append(out, slotOwner{lo: r.Start, hi: r.End, master: master, health: health})
		}
	}
	// Each node lists the shards in its own order.
	sort.Slice(out, func(i, j int) bool { return out[i].lo < out[j].lo })
	return out, nil
}
