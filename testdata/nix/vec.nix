let
  dep = builtins.toFile "sig-vec-dep.txt" "dependency\n";
in derivation {
  name = "sig-vec";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo hi > $out; echo ${dep} >> $out; echo $out >> $out" ];
}
