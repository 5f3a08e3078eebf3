package testnet

import (
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

func testLogger(t *testing.T) *logrus.Entry {
	l := logrus.New()
	l.SetOutput(os.Stderr)
	if lv, err := logrus.ParseLevel(os.Getenv("KISS_ONION_TEST_LOG")); err == nil {
		l.SetLevel(lv)
	} else {
		l.SetLevel(logrus.WarnLevel)
	}
	return logrus.NewEntry(l)
}

// TestNetworkStartsClientsAndStopsClean starts a network twice in the same
// directory (the second time reusing its keys), bootstraps a client on it,
// and checks that Close leaves no tor behind.
func TestNetworkStartsClientsAndStopsClean(t *testing.T) {
	dir := t.TempDir()
	var pids []int
	var idents []string
	for round := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		began := time.Now()
		n, err := Start(ctx, dir, testLogger(t))
		cancel()
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		t.Logf("round %d: network ready in %v", round, time.Since(began).Round(time.Millisecond))
		lines := n.TorrcLines()
		var auths []string
		for _, l := range lines {
			if strings.HasPrefix(l, "DirAuthority ") {
				f := strings.Fields(l)
				auths = append(auths, f[len(f)-1])
			}
		}
		if len(auths) != 3 {
			t.Errorf("TorrcLines has %d DirAuthority lines, want 3: %q", len(auths), lines)
		}
		idents = append(idents, strings.Join(auths, ","))
		began = time.Now()
		c, err := n.StartClient(context.Background(), t.TempDir(), "")
		if err != nil {
			n.Close()
			t.Fatal(err)
		}
		t.Logf("round %d: client bootstrapped in %v, socks %s", round, time.Since(began).Round(time.Millisecond), c.SocksAddr())
		pids = append(pids, c.PID())
		for _, nd := range n.nodes {
			pids = append(pids, nd.proc.cmd.Process.Pid)
		}
		if err := n.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	}
	if idents[0] != idents[1] {
		t.Errorf("restarted network has new authority keys: %s then %s", idents[0], idents[1])
	}
	for _, pid := range pids {
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("tor pid %d still running after Close", pid)
		}
	}
}
