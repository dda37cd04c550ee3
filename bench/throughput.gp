# Bar chart of each system's and mode's median bets/s (error bars: min..max of
# the alternated runs). Run by bench/compare.sh in its output directory.
set terminal pngcairo size 1100,560 font "DejaVu Sans,10"
set output "throughput.png"
set title "Ingest throughput, closed loop (median of alternated runs; bars: min–max)"
set ylabel "bets per second (millions)"
set style fill solid 0.85 border -1
set boxwidth 0.7
set grid ytics
set xtics rotate by -30 left nomirror
set yrange [0:*]
set key off
set bmargin 7
set rmargin 14
# Colours: 1 discard sink (grey), 2 Redis (red), 3 lottery-server (blue).
set palette defined (1 "#888888", 2 "#c0392b", 3 "#2e6fba")
set cbrange [1:3]
unset colorbox
plot "throughput.dat" using 0:($2/1e6):5:xtic(1) with boxes lc palette, \
     "" using 0:($2/1e6):($3/1e6):($4/1e6) with yerrorbars lc rgb "black" pt 0, \
     "" using 0:($2/1e6):(sprintf("%.2f", $2/1e6)) with labels offset 0,1 font ",9"
