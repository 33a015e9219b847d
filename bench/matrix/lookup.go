// Go's net.LookupHost for each name on stdin, one JSON line each; the
// resolver (pure Go or cgo) is chosen with GODEBUG=netdns=go|cgo.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"net"
	"os"
	"time"
)

func errorName(err error) string {
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		switch {
		case dnsErr.IsNotFound:
			return "DNSError{IsNotFound}: " + dnsErr.Err
		case dnsErr.IsTimeout:
			return "DNSError{IsTimeout}: " + dnsErr.Err
		case dnsErr.IsTemporary:
			return "DNSError{IsTemporary}: " + dnsErr.Err
		}
		return "DNSError: " + dnsErr.Err
	}
	return err.Error()
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		t := time.Now()
		found, err := net.LookupHost(in.Text())
		row := map[string]any{"elapsed_ms": float64(time.Since(t).Microseconds()) / 1000}
		if err != nil {
			row["error"] = errorName(err)
		} else {
			row["addresses"] = found
		}
		out.Encode(row)
	}
}
