// InetAddress.getAllByName for each name read from stdin, one JSON line each.
// One JVM per run, so its positive and negative caches carry between lookups.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.InetAddress;

public class Lookup {
    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String name;
        while ((name = in.readLine()) != null) {
            long t = System.nanoTime();
            StringBuilder out = new StringBuilder("{");
            try {
                InetAddress[] found = InetAddress.getAllByName(name);
                out.append("\"addresses\": [");
                for (int i = 0; i < found.length; i++) {
                    out.append(i > 0 ? ", " : "").append('"').append(found[i].getHostAddress()).append('"');
                }
                out.append("]");
            } catch (Exception e) {
                out.append("\"error\": \"").append(e.getClass().getSimpleName()).append('"');
            }
            out.append(String.format(", \"elapsed_ms\": %.1f}", (System.nanoTime() - t) / 1e6));
            System.out.println(out);
            System.out.flush();
        }
    }
}
