package fakeanthropic

import (
	"crypto/sha256"
	"hash"
	"strconv"
	"strings"
	"time"
)

// Prompt caching, as the API does it:
//
//   - A block with cache_control (an entry of tools, a system text block, a
//     block of a message's content) is a breakpoint. Its prefix runs tools,
//     then system, then messages, up to and including that block.
//   - A prefix shorter than the group's minimum (Group.CacheMinTokens) is
//     not cached.
//   - At admission the longest breakpoint whose prefix is cached and alive
//     is read (cache_read_input_tokens), and its lifetime refreshed; every
//     later breakpoint is written (cache_creation_input_tokens, the tokens
//     past the read). input_tokens are the rest, after the last breakpoint
//     read or written.
//   - A written entry becomes readable when its answer begins (just before
//     message_start, or the first output token of a non-streaming answer),
//     so two calls that start before either begins both write.
//
// Simplifications: only the breakpoints themselves are looked up (the API
// also checks up to 20 blocks before each one); the cache is global (one
// organization) and per exact model name; tool_choice, thinking and images
// do not change the key except as blocks of the prefix.

// breakpoint is one cache_control block: its prefix's tokens and key.
type breakpoint struct {
	tokens int               // CountTokens of the prefix, framing included
	key    [sha256.Size]byte // model and prefix content
	ttl    time.Duration     // 5 min or 1 h
}

// breakpoints lists req's breakpoints in prefix order.
func breakpoints(req *messagesRequest) []breakpoint {
	want := countBreakpoints(req.tools, req.system, req.turns)
	if want == 0 {
		return nil // nothing to hash
	}
	h := sha256.New()
	writeString(h, req.model)
	n := framingTokens
	bps := make([]breakpoint, 0, want)
	visit := func(kind string, b block) {
		if len(bps) == want {
			return // past the last breakpoint: nothing more to hash
		}
		n += b.tokens()
		writeString(h, kind)
		writeString(h, b.typ)
		if b.typ == "text" {
			writeString(h, b.text)
		} else {
			writeString(h, string(b.raw))
		}
		if b.cache != nil {
			bp := breakpoint{tokens: n, ttl: b.cache.ttl}
			h.Sum(bp.key[:0])
			bps = append(bps, bp)
		}
	}
	for _, b := range req.tools {
		visit("tool", b)
	}
	for _, b := range req.system {
		visit("system", b)
	}
	for _, t := range req.turns {
		n += perMessageTokens
		writeString(h, "message")
		writeString(h, t.role)
		for _, b := range t.blocks {
			visit("block", b)
		}
	}
	return bps
}

// writeString writes s length-prefixed, so that no two sequences of
// strings hash alike.
func writeString(h hash.Hash, s string) {
	_, _ = h.Write([]byte(strconv.Itoa(len(s))))
	_, _ = h.Write([]byte{':'})
	_, _ = h.Write([]byte(s))
}

// minCacheTokens is the shortest prefix g caches for model.
func (g *groupState) minCacheTokens(model string) int {
	switch {
	case g.CacheMinTokens > 0:
		return g.CacheMinTokens
	case strings.Contains(strings.ToLower(model), "haiku"):
		return 2048
	}
	return 1024
}

// cachePlan is what one call reads from and writes to the cache.
type cachePlan struct {
	read     int         // cache_read_input_tokens
	readKey  *breakpoint // the breakpoint read, nil for none
	writes   []breakpoint
	creation int // cache_creation_input_tokens
	// creation by the ttl of the breakpoint that writes it
	creation5m, creation1h int
}

// planCache decides what a call with these breakpoints reads and writes at
// now. The caller holds Server.mu; nothing changes until touchCache.
func (s *Server) planCache(bps []breakpoint, minTokens int, now time.Time) cachePlan {
	var eligible []breakpoint
	for _, bp := range bps {
		if bp.tokens >= minTokens {
			eligible = append(eligible, bp)
		}
	}
	var p cachePlan
	hit := -1
	for i := len(eligible) - 1; i >= 0; i-- {
		if exp, ok := s.cache[eligible[i].key]; ok && exp.After(now) {
			hit = i
			p.read, p.readKey = eligible[i].tokens, &eligible[i]
			break
		}
	}
	p.writes = eligible[hit+1:]
	prev := p.read
	for _, w := range p.writes {
		seg := w.tokens - prev
		prev = w.tokens
		if w.ttl == cacheTTL1h {
			p.creation1h += seg
		} else {
			p.creation5m += seg
		}
	}
	p.creation = prev - p.read
	return p
}

// touchCache refreshes the lifetime of the entry p reads. The caller holds
// Server.mu.
func (s *Server) touchCache(p cachePlan, now time.Time) {
	if p.readKey != nil {
		s.keepCache(*p.readKey, now)
	}
}

// commitCache makes the entries a call writes readable, from now. The
// caller holds Server.mu.
func (s *Server) commitCache(writes []breakpoint, now time.Time) {
	for _, w := range writes {
		s.keepCache(w, now)
	}
	if len(s.cache) >= s.cacheSweepAt {
		for k, exp := range s.cache {
			if !exp.After(now) {
				delete(s.cache, k)
			}
		}
		s.cacheSweepAt = max(cacheSweepMin, 2*len(s.cache))
	}
}

// cacheSweepMin is the cache size at which expired entries are first swept.
const cacheSweepMin = 1024

// keepCache makes bp's entry live until now + its ttl at least.
func (s *Server) keepCache(bp breakpoint, now time.Time) {
	if exp := now.Add(bp.ttl); exp.After(s.cache[bp.key]) {
		s.cache[bp.key] = exp
	}
}

// ClearCache empties the prompt cache and returns how many live entries it
// held. Calls in flight that write the cache still write it when their
// answer begins. POST /_fake/cache/clear does the same.
func (s *Server) ClearCache() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.liveCacheEntries()
	s.cache = map[[sha256.Size]byte]time.Time{}
	s.cacheSweepAt = cacheSweepMin
	return n
}

// liveCacheEntries counts the entries not expired. The caller holds
// Server.mu.
func (s *Server) liveCacheEntries() int {
	now := s.now()
	n := 0
	for _, exp := range s.cache {
		if exp.After(now) {
			n++
		}
	}
	return n
}
