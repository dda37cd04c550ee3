# Batch-acknowledgement latency by percentile: the sink, each Redis mode and
# the fastest lottery-server mode of each durability (colour: system; dashes:
# durability none / group / always).
# Left, open loop at half of each one's maximum (what a client sees at a
# sustainable load); right, closed loop at maximum load. The x axis is
# 1/(1-p) on a log scale, so the tail gets room. Run by bench/compare.sh.
set terminal pngcairo size 1300,560 font "DejaVu Sans,10"
set output "latency.png"
set logscale xy
set grid xtics ytics mytics
set xtics ("50%%" 2, "90%%" 10, "99%%" 100, "99.9%%" 1000, "99.99%%" 10000, "99.999%%" 100000)
set xrange [1:100000]
set xlabel "percentile"
set ylabel "ack latency (µs)"
set key top left font ",8" spacing 0.9
load "latency-series.gp"  # open_series, closed_series: written by compare_report.py
set multiplot layout 1,2
set title "open loop at ½ of each system's maximum"
plot for [i=1:open_series] "latency-open.dat" index i-1 using 1:2 with linespoints pt 7 ps 0.4 lw 2 \
     lc rgb open_colour[i] dt open_dash[i] title columnheader(1)
set title "closed loop at maximum load (median run)"
plot for [i=1:closed_series] "latency-closed.dat" index i-1 using 1:2 with linespoints pt 7 ps 0.4 lw 2 \
     lc rgb closed_colour[i] dt closed_dash[i] title columnheader(1)
unset multiplot
