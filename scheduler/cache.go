package scheduler

import (
	"context"
	_ "embed"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
)

var (
	//go:embed lua/cache.lua
	cacheSrc    string
	cacheScript = redis.NewScript(prelude + cacheSrc)
)

// CachePrefix is a cacheable prefix of a job's request: a prompt-cache
// breakpoint the upstream will read or write (package cachekey finds them).
type CachePrefix struct {
	// Hash names the prefix (cachekey.Prefix.Hash, or any stable string of
	// letters and digits).
	Hash string
	// Tokens is the prefix's estimated input tokens, calibrated as the
	// job's whole input estimate is, so that the two can be subtracted.
	Tokens int
	// TTL is the cache lifetime the breakpoint asks for (5m or 1h).
	TTL time.Duration
}

// hashLen is how much of a prefix hash sluice keeps: 128 bits.
const hashLen = 32

// encodePrefixes is the record's form of a job's prefixes:
// "hash:tokens:ttl_ms;…" (lua/prelude.lua's cache_prefixes reads it).
func encodePrefixes(ps []CachePrefix) string {
	var b strings.Builder
	for _, p := range ps {
		h := p.Hash
		if len(h) > hashLen {
			h = h[:hashLen]
		}
		if h == "" || strings.ContainsAny(h, ":;,") || p.Tokens <= 0 {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(';')
		}
		fmt.Fprintf(&b, "%s:%d:%d", h, p.Tokens, p.TTL.Milliseconds())
	}
	return b.String()
}

// countReads is the scripts' flag for a group whose input limit counts
// cache reads (then a cached prefix saves nothing of it).
func countReads(g *config.ModelGroup) string {
	if g.CountCacheReads {
		return "1"
	}
	return "0"
}

// CacheUsage is what an answer's message_start reported of its input.
type CacheUsage struct {
	Input, CacheCreation, CacheRead int
}

// CacheBegan records that job id's answer began with usage u: the group's
// cache figures count it, the job's prefixes are known cached (or, when it
// neither read nor wrote the cache, not cacheable), and jobs held for them
// may go. It reports how many holds it ended.
func (s *Scheduler) CacheBegan(ctx context.Context, g *config.ModelGroup, id string, u CacheUsage) (int, error) {
	return s.cacheNote(ctx, g, id, "began", u)
}

// CacheReleased records that job id's call ended before its answer began:
// jobs held for the prefixes it was to write may go.
func (s *Scheduler) CacheReleased(ctx context.Context, g *config.ModelGroup, id string) (int, error) {
	return s.cacheNote(ctx, g, id, "released", CacheUsage{})
}

func (s *Scheduler) cacheNote(ctx context.Context, g *config.ModelGroup, id, what string, u CacheUsage) (int, error) {
	n, err := runInt(ctx, s.rdb, cacheScript, cacheIn{Now: s.now(), Group: g.Name, JobID: id, What: what, Usage: u})
	if err != nil {
		return 0, fmt.Errorf("scheduler: cache %s %s: %w", what, id, err)
	}
	return int(n), nil
}

// cacheIn is lua/cache.lua's input; its reply is how many holds it ended.
type cacheIn struct {
	Now   int64
	Group string
	JobID string
	What  string // "began" or "released"
	Usage CacheUsage
}

func (in cacheIn) call() ([]string, []any) {
	k := keys{in.Group}
	return []string{k.cache(), jobs.Key(in.JobID), k.rate()},
		[]any{in.Now, in.JobID, in.What, in.Usage.Input, in.Usage.CacheCreation, in.Usage.CacheRead, wakeChannel(in.Group)}
}

// CacheStats are a group's prompt-cache figures over the last minutes.
type CacheStats struct {
	// Window is the span the token figures cover.
	Window time.Duration
	// InputTokens is all input of the answers begun in Window (uncached,
	// written to and read from the cache); CacheRead and CacheCreation
	// its parts read from and written to the cache.
	InputTokens, CacheRead, CacheCreation int64
	// Held is how many queued jobs the last dispatch round held for
	// another's cache write.
	Held int64
}

// ReadRatio is the share of input read from the cache; ok is false when
// no input was seen.
func (c CacheStats) ReadRatio() (ratio float64, ok bool) {
	if c.InputTokens <= 0 {
		return 0, false
	}
	return float64(c.CacheRead) / float64(c.InputTokens), true
}

// cacheWindow is how many whole minutes CacheStats sums (the current one too).
const cacheWindow = 5

// CacheStats reads group g's prompt-cache figures.
func (s *Scheduler) CacheStats(ctx context.Context, g string) (CacheStats, error) {
	now, err := s.nowTime(ctx)
	if err != nil {
		return CacheStats{}, err
	}
	k := keys{g}
	minute := now.UnixMilli() / 60000
	fields := make([]string, 0, 3*cacheWindow)
	for m := minute - cacheWindow + 1; m <= minute; m++ {
		ms := strconv.FormatInt(m, 10)
		fields = append(fields, "ct"+ms, "cr"+ms, "cc"+ms)
	}
	pipe := s.rdb.Pipeline()
	rate := pipe.HMGet(ctx, k.rate(), fields...)
	held := pipe.HGet(ctx, k.lim(), "held")
	if _, err := pipe.Exec(ctx); err != nil && err != redis.Nil {
		return CacheStats{}, err
	}
	out := CacheStats{Window: cacheWindow * time.Minute}
	for i, v := range rate.Val() {
		n, _ := strconv.ParseInt(fmt.Sprint(v), 10, 64)
		switch i % 3 {
		case 0:
			out.InputTokens += n
		case 1:
			out.CacheRead += n
		case 2:
			out.CacheCreation += n
		}
	}
	out.Held, _ = held.Int64()
	return out, nil
}
