// Package pricing turns an upstream call's token usage into dollars: a
// price per model (input, output, cache writes of 5 minutes and of an
// hour, cache reads, the Message Batches discount), a shipped table of the
// Claude models' published prices, and the configuration's own entries,
// which win over it.
//
// Costs are kept in whole micro-dollars (µ$, a millionth of a dollar), so
// that Redis can add them up exactly with HINCRBY; one call's cost is
// rounded to the nearest µ$.
package pricing

import (
	"math"
	"path"
)

// Price is one model's price in US dollars per million tokens (MTok).
type Price struct {
	Input        float64 // base input tokens
	Output       float64 // output tokens
	CacheWrite5m float64 // cache writes with the default 5-minute lifetime
	CacheWrite1h float64 // cache writes with the 1-hour lifetime
	CacheRead    float64 // cache hits and refreshes
	// BatchDiscount is the part of the price the Message Batches API
	// takes off (0.5 = half price).
	BatchDiscount float64
	// Long, when set, is the price of a call whose prompt (input, cache
	// reads and cache writes) is over LongAbove tokens: every token of that
	// call, output included, at this price.
	Long      *Price
	LongAbove int
}

// Usage is what a call used, as the upstream reports it.
type Usage struct {
	InputTokens  int
	OutputTokens int
	// CacheWriteTokens is cache_creation_input_tokens; CacheWrite1h the
	// part of it written for an hour (the usage's cache_creation object).
	// The rest is priced as 5-minute writes.
	CacheWriteTokens int
	CacheWrite1h     int
	CacheReadTokens  int
	// Batch: the call went through the Message Batches API.
	Batch bool
}

// MicroUSD is what u costs at p, in µ$, rounded to the nearest.
func (p Price) MicroUSD(u Usage) int64 {
	if p.Long != nil && u.InputTokens+u.CacheWriteTokens+u.CacheReadTokens > p.LongAbove {
		long := *p.Long
		long.BatchDiscount = p.BatchDiscount
		return long.MicroUSD(u)
	}
	w1h := min(max(u.CacheWrite1h, 0), u.CacheWriteTokens)
	w5m := u.CacheWriteTokens - w1h
	// Dollars per MTok × tokens = µ$.
	c := p.Input*float64(u.InputTokens) + p.Output*float64(u.OutputTokens) +
		p.CacheWrite5m*float64(w5m) + p.CacheWrite1h*float64(w1h) + p.CacheRead*float64(u.CacheReadTokens)
	if u.Batch {
		c *= 1 - p.BatchDiscount
	}
	return int64(math.Round(c))
}

// USD is a µ$ amount in dollars.
func USD(micro int64) float64 { return float64(micro) / 1e6 }

// Entry prices the models its patterns match (path.Match patterns, as a
// model group's models).
type Entry struct {
	Models []string
	Price  Price
}

// Table finds a model's price: the configured entries first, then the
// shipped ones; within each, the longest pattern that matches wins, so
// "claude-opus-4-1*" beats "claude-opus-4*".
type Table struct {
	tiers [][]Entry
}

// NewTable is a table of the configured entries over the shipped
// Defaults (none when defaults is false).
func NewTable(configured []Entry, defaults bool) *Table {
	t := &Table{tiers: [][]Entry{configured}}
	if defaults {
		t.tiers = append(t.tiers, Defaults())
	}
	return t
}

// Lookup is model's price, and whether any entry prices it.
func (t *Table) Lookup(model string) (Price, bool) {
	if t == nil {
		return Price{}, false
	}
	for _, tier := range t.tiers {
		best, found := -1, Price{}
		for _, e := range tier {
			for _, pat := range e.Models {
				if ok, _ := path.Match(pat, model); ok && len(pat) > best {
					best, found = len(pat), e.Price
				}
			}
		}
		if best >= 0 {
			return found, true
		}
	}
	return Price{}, false
}

// std is a price with the usual cache multipliers: 5-minute writes 1.25×
// the input price, 1-hour writes 2×, reads 0.1×; batches half price.
func std(in, out float64) Price {
	return Price{Input: in, Output: out, CacheWrite5m: in * 1.25, CacheWrite1h: in * 2, CacheRead: in / 10, BatchDiscount: 0.5}
}

// withRead is p with another cache-read price.
func withRead(p Price, read float64) Price { p.CacheRead = read; return p }

// Defaults is the shipped table: the Claude API's published prices per
// million tokens, as of December 2026. Prices change: an operator who is
// billed otherwise (another price list, a negotiated discount, a cloud
// provider's prices) writes entries of their own in the configuration,
// which win over these.
func Defaults() []Entry {
	haiku55 := std(0.10, 0.50)
	haiku55.CacheRead = 0.01
	long := std(0.50, 2.50)
	long.CacheRead = 0.05
	haiku55.Long, haiku55.LongAbove = &long, 100000
	return []Entry{
		{Models: []string{"claude-fable-5-1*", "claude-mythos-5-1*"}, Price: withRead(std(10, 50), 0.25)},
		{Models: []string{"claude-fable-5*", "claude-mythos-5*"}, Price: withRead(std(10, 50), 1)},
		{Models: []string{"claude-opus-5-5*"}, Price: withRead(std(4, 20), 0.20)},
		{Models: []string{"claude-opus-5*", "claude-opus-4*"}, Price: std(5, 25)},
		{Models: []string{"claude-opus-4-1*", "claude-opus-4-0*", "claude-opus-4-2025*", "claude-3-opus*"}, Price: std(15, 75)},
		{Models: []string{"claude-sonnet-5-5*"}, Price: withRead(std(2, 10), 0.10)},
		{Models: []string{"claude-sonnet-5*"}, Price: std(2, 10)},
		{Models: []string{"claude-sonnet-4*", "claude-3-7-sonnet*", "claude-3-5-sonnet*"}, Price: std(3, 15)},
		{Models: []string{"claude-haiku-5-5*"}, Price: haiku55},
		{Models: []string{"claude-haiku-4*"}, Price: std(1, 5)},
		{Models: []string{"claude-3-5-haiku*"}, Price: std(0.80, 4)},
		{Models: []string{"claude-3-haiku*"}, Price: Price{Input: 0.25, Output: 1.25, CacheWrite5m: 0.30, CacheWrite1h: 0.50, CacheRead: 0.03, BatchDiscount: 0.5}},
	}
}
